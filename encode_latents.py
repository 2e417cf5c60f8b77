"""Encode images once with a VAE into a latent dataset (each image's posterior mean and std) for latent diffusion.

    python encode_latents.py --vae stabilityai/sd-vae-ft-ema --dataset_name fashion_mnist --output_dir latents/fm
    accelerate launch encode_latents.py --vae my_vae/ --train_data_dir images/ --resolution 256 --random_flip \\
        --output_dir latents/mine --push_to_hub --hub_dataset_id me/mine-latents
    accelerate launch train_cfm.py --latent_dataset latents/fm

The dataset (format: modules/latents.py) keeps the images' order and is the same whatever the number of processes:
shard k is encoded by process k % num_processes and written whole or not at all. Rerunning with the same arguments
resumes, skipping finished shards; latents.json is written last, once every shard is whole. Images are always
center-cropped, so the encoding is deterministic; --random_flip also stores each image's flipped latents, for the
trainer to pick per step. Every flag: python encode_latents.py --help.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from modules.config import DataArguments, UserError, _help, cli_entry, parse_args
from modules.data import load_train_data
from modules.latents import (
    FLIP_COLUMNS,
    LATENT_COLUMNS,
    METADATA_FILE,
    channel_statistics,
    encode_shard,
    shard_is_complete,
    shard_name,
    shard_ranges,
    write_shard,
)
from modules.vae import load_vae

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ARGS_FILE = ".encode_args.json"  # what the shards were made with, so a rerun never mixes in other latents


@dataclass
class EncodeArguments:
    vae: str = _help(
        "The VAE: a Hub id (e.g. stabilityai/sd-vae-ft-ema, or a pipeline with vae/) or a local directory written by "
        "save_pretrained."
    )
    output_dir: str = _help("Directory of the latent dataset; rerunning with the same arguments resumes there.")
    vae_revision: str | None = _help("Hub revision (branch, tag or commit) of the VAE.", default=None)
    batch_size: int = _help("Images per VAE forward pass, per process.", default=64)
    shard_size: int = _help("Images per parquet shard (the unit of work, of resume and of upload).", default=10000)
    dtype: Literal["fp32", "fp16", "bf16"] = _help("Precision the VAE runs in; latents are stored as float16.",
                                                   default="fp32")  # fmt: skip
    overwrite: bool = _help("Replace latents in --output_dir that were encoded with other arguments.", default=False)
    push_to_hub: bool = _help("Upload the finished dataset to the Hub as a dataset repo.", default=False)
    hub_dataset_id: str | None = _help("Hub dataset repo to push to. Default: the name of --output_dir.", default=None)
    hub_private_repo: bool = _help("Create the Hub repo as private.", default=False)
    hub_token: str | None = _help("Hub token (never written anywhere). Default: $HF_TOKEN or the saved login.",
                                  default=None)  # fmt: skip


def validate(data_args: DataArguments, args: EncodeArguments):
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if data_args.latent_dataset:
        raise UserError("--latent_dataset is for training; encode_latents.py reads images (--dataset_name or "
                        "--train_data_dir)")  # fmt: skip


def check_fits(vae, data, resolution: int):
    f = vae.downsample_factor
    if resolution % f:
        raise UserError(
            f"--resolution {resolution} is not a multiple of {f}, the downsample factor of VAE '{vae.source}'"
        )
    if data.num_channels not in (1, vae.in_channels):
        raise UserError(
            f"the images have {data.num_channels} channels, but VAE '{vae.source}' takes {vae.in_channels}"
        )


def check_output_dir(out: Path, record: dict, overwrite: bool):
    """Refuse to resume into latents made with other arguments, naming each key that differs."""
    if (out / ARGS_FILE).is_file():
        before = json.loads((out / ARGS_FILE).read_text())
        diff = [k for k in sorted(set(before) | set(record)) if before.get(k) != record.get(k)]
        if diff and not overwrite:
            detail = "; ".join(f"{k}: {before.get(k)!r} then, {record.get(k)!r} now" for k in diff)
            raise UserError(
                f"--output_dir '{out}' holds latents encoded with other arguments ({detail}); rerun with the same "
                "arguments to resume, give another --output_dir, or pass --overwrite to replace them"
            )
    elif out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UserError(f"--output_dir '{out}' exists and was not written by encode_latents.py; give a new directory")


def prepare_output_dir(out: Path, record: dict, overwrite: bool):
    """Main process: mark the dataset incomplete until this run finishes, and record the arguments."""
    if overwrite:
        for path in (out / "data").glob("*train-*.parquet*"):  # shards, and partial ones
            path.unlink()
    (out / METADATA_FILE).unlink(missing_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / ARGS_FILE, json.dumps(record, indent=2))


def write_text_atomically(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def command_line(argv) -> str:
    """The command as run, with any --hub_token value hidden."""
    args, hide = [], False
    for arg in sys.argv[1:] if argv is None else argv:
        args.append("***" if hide else "--hub_token=***" if str(arg).startswith("--hub_token=") else str(arg))
        hide = arg == "--hub_token"
    return shlex.join(["python", "encode_latents.py", *args])


def dataset_card(meta: dict) -> str:
    import yaml

    header = {
        "pretty_name": f"VAE latents of {meta['source']}",
        "tags": ["latents", "vae", "latent-diffusion"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    vae, (c, h, w) = meta["vae"], meta["latent_shape"]
    stats = "\n".join(
        f"| {i} | {m:.5g} | {s:.5g} |"
        for i, (m, s) in enumerate(zip(meta["channel_mean"], meta["channel_std"], strict=True))
    )
    columns = {
        "mean": f"posterior mean, float16 ({c}, {h}, {w}), raw (before any scaling)",
        "std": f"posterior std, float16 ({c}, {h}, {w})",
        "flip_mean": "posterior mean of the horizontally flipped image",
        "flip_std": "posterior std of the horizontally flipped image",
        "label": f"class label ({meta['num_classes']} classes)",
        "caption": "text caption of the image",
    }
    rows = "\n".join(f"| {name} | {columns[name]} |" for name in meta["columns"])
    res = meta["image_resolution"]
    summary = (
        f"{meta['num_images']} images of {meta['source']} at {res}x{res} pixels (center-cropped), encoded by the VAE "
        f"`{vae['source']}` ({vae['kind']}, {meta['vae_dtype']}, downsample factor {vae['downsample_factor']}) into "
        f"latents of shape {c}x{h}x{w}, in the images' order, in {len(meta['shards'])} shard(s)."
    )
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---
# VAE latents of {meta["source"]}

{summary}

| column | content |
|---|---|
{rows}

## Normalisation

A training step draws z = mean + std * eps and uses (z - channel_mean) / channel_std. The statistics are
{meta["channel_statistics"]}.

| channel | channel_mean | channel_std |
|---|---|---|
{stats}

## How it was made

```
{meta["command"]}
```

Load it with `modules.latents.load_latent_data("<this directory or repo id>")`, or with `datasets.load_dataset`.
latents.json holds the same facts, the VAE's full record and the arguments that name the source images.
"""


def push_to_hub(out: Path, args: EncodeArguments):
    """Upload the finished dataset; on failure warn and say how to push later (the local dataset is complete)."""
    from huggingface_hub import HfApi

    repo_id = args.hub_dataset_id or out.resolve().name
    try:
        api = HfApi(token=args.hub_token)  # None: $HF_TOKEN or the saved login
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=args.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(folder_path=out, repo_id=repo_id, repo_type="dataset", ignore_patterns=[".*", "*/.*"])
        print(f"pushed to https://huggingface.co/datasets/{repo_id}")
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: the local dataset is still complete
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        for secret in filter(None, (args.hub_token, os.environ.get("HF_TOKEN"))):
            reason = reason.replace(secret, "***")
        print(
            f"warning: could not push to the Hub ({type(e).__name__}: {reason}); {out} is complete: push it later "
            f"with `hf upload {repo_id} {out} --repo-type dataset`",
            file=sys.stderr,
        )


def encode_my_shards(state, vae, data, data_args: DataArguments, args: EncodeArguments) -> list[Path]:
    """Encode the unfinished shards that fall to this process (k % num_processes); returns every shard's path."""
    from tqdm.auto import tqdm

    ranges = shard_ranges(len(data.dataset), args.shard_size)
    paths = [Path(args.output_dir) / shard_name(k, len(ranges)) for k in range(len(ranges))]
    done = {k for k, path in enumerate(paths) if shard_is_complete(path, len(ranges[k]))}
    if done:
        state.print(f"resuming: {len(done)} of {len(ranges)} shards already complete, skipped")
    mine = [k for k in range(len(ranges)) if k % state.num_processes == state.process_index and k not in done]
    progress = tqdm(total=sum(len(ranges[k]) for k in mine), unit="img", dynamic_ncols=True,
                    desc=f"encoding ({state.num_processes} processes)" if state.num_processes > 1 else "encoding",
                    disable=not state.is_main_process)  # fmt: skip
    with progress:  # closed on errors too, so an error message starts on a line of its own
        for k in mine:
            shard = encode_shard(vae, data.dataset, ranges[k], args.batch_size, data_args.dataloader_num_workers,
                                 data_args.random_flip, progress)  # fmt: skip
            if data.captions is not None:
                shard["caption"] = [str(data.captions[i]) for i in ranges[k]]
            write_shard(paths[k], shard, data.class_names)
    return paths


def write_metadata(paths, vae, data, data_args: DataArguments, args: EncodeArguments, record: dict, argv):
    """Main process, once every shard is whole: the dataset card, then latents.json, which marks it complete."""
    out = Path(args.output_dir)
    ranges = shard_ranges(len(data.dataset), args.shard_size)
    missing = [str(p) for p, r in zip(paths, ranges, strict=True) if not shard_is_complete(p, len(r))]
    if missing:
        raise RuntimeError(f"shards missing after every process finished: {', '.join(missing)}")
    res, f = data_args.resolution, vae.downsample_factor
    source_args = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "latent_dataset"}  # for FID
    meta = dict(
        source=data_args.train_data_dir or f"{data_args.dataset_name} ({data_args.dataset_split} split)",
        vae=vae.config_record(), vae_dtype=args.dtype, image_resolution=res, image_channels=data.num_channels,
        latent_shape=[vae.latent_channels, res // f, res // f], num_images=len(data.dataset),
        columns=record["columns"], shards=[str(p.relative_to(out)) for p in paths],
        **channel_statistics(paths, vae.latent_channels),
        num_classes=data.num_classes, class_names=list(data.class_names) if data.class_names else None,
        source_key=data.key, data_args=source_args, command=command_line(argv),
    )  # fmt: skip
    write_text_atomically(out / "README.md", dataset_card(meta))
    write_text_atomically(out / METADATA_FILE, json.dumps(meta, indent=2))
    c, h, w = meta["latent_shape"]
    print(f"wrote {meta['num_images']} latents ({c}x{h}x{w}) in {len(paths)} shard(s) to {out}")


@cli_entry
def main(argv=None):
    from accelerate import PartialState

    data_args, args = parse_args((DataArguments, EncodeArguments), argv, description=__doc__)
    validate(data_args, args)
    # Several processes without GPUs (`accelerate launch --multi_gpu` on CPUs) talk over gloo.
    state = PartialState(cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ)
    data_args = dataclasses.replace(data_args, center_crop=True)  # no random crops: a rerun gives the same latents
    data = load_train_data(data_args)
    vae_path = Path(args.vae).expanduser()
    vae_source = str(vae_path.resolve()) if vae_path.is_dir() else args.vae  # found again from any directory
    vae = load_vae(vae_source, state.device, DTYPES[args.dtype], args.vae_revision)
    check_fits(vae, data, data_args.resolution)
    columns = [*LATENT_COLUMNS, *(FLIP_COLUMNS if data_args.random_flip else ())]
    columns += ["label"] * (data.num_classes > 0) + ["caption"] * (data.captions is not None)
    record = dict(vae=vae_source, vae_revision=args.vae_revision, dtype=args.dtype, data=data.key,
                  resolution=data_args.resolution, num_images=len(data.dataset), shard_size=args.shard_size,
                  columns=columns)  # fmt: skip

    out = Path(args.output_dir)
    check_output_dir(out, record, args.overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_output_dir(out, record, args.overwrite)
    state.wait_for_everyone()
    paths = encode_my_shards(state, vae, data, data_args, args)
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(paths, vae, data, data_args, args, record, argv)
        if args.push_to_hub:
            push_to_hub(out, args)
    state.wait_for_everyone()
    return out


if __name__ == "__main__":
    main()
