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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from modules.config import DataArguments, UserError, _help, cli_entry, parse_args
from modules.data import load_train_data
from modules.latents import FLIP_COLUMNS, LATENT_COLUMNS, METADATA_FILE, channel_statistics, encode_shard, latent_table
from modules.shards import ShardedFormat, ShardedOutputArguments, card_header, process_state, write_sharded_dataset
from modules.vae import load_vae

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT = ShardedFormat(script="encode_latents.py", what="latents", metadata_file=METADATA_FILE,
                       args_file=".encode_args.json")  # fmt: skip


@dataclass
class EncodeArguments:
    vae: str = _help(
        "The VAE: a Hub id (e.g. stabilityai/sd-vae-ft-ema, or a pipeline with vae/) or a local directory written by "
        "save_pretrained."
    )
    vae_revision: str | None = _help("Hub revision (branch, tag or commit) of the VAE.", default=None)
    batch_size: int = _help("Images per VAE forward pass, per process.", default=64)
    dtype: Literal["fp32", "fp16", "bf16"] = _help("Precision the VAE runs in; latents are stored as float16.",
                                                   default="fp32")  # fmt: skip


def validate(data_args: DataArguments, args: EncodeArguments, out_args: ShardedOutputArguments):
    for name, value in (("batch_size", args.batch_size), ("shard_size", out_args.shard_size)):
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
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


def dataset_card(meta: dict, paths) -> str:
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
    header = card_header(f"VAE latents of {meta['source']}", ["latents", "vae", "latent-diffusion"], paths)
    return f"""{header}# VAE latents of {meta["source"]}

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


def shard_maker(vae, data, data_args: DataArguments, args: EncodeArguments):
    """`make_shard(rows, progress)`: the latents (and labels, captions) of those images, as a pyarrow table."""

    def make_shard(rows: range, progress):
        shard = encode_shard(vae, data.dataset, rows, args.batch_size, data_args.dataloader_num_workers,
                             data_args.random_flip, progress)  # fmt: skip
        if data.captions is not None:
            shard["caption"] = [str(data.captions[i]) for i in rows]
        return latent_table(shard, data.class_names)

    return make_shard


def describer(vae, data, data_args: DataArguments, args: EncodeArguments, out: Path, record: dict):
    """`describe(shard_paths, command)`: the dataset card and latents.json, once every shard is whole."""

    def describe(paths, command: str):
        res, f = data_args.resolution, vae.downsample_factor
        source_args = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "latent_dataset"}  # for FID
        meta = dict(
            source=data_args.train_data_dir or f"{data_args.dataset_name} ({data_args.dataset_split} split)",
            vae=vae.config_record(), vae_dtype=args.dtype, image_resolution=res, image_channels=data.num_channels,
            latent_shape=[vae.latent_channels, res // f, res // f], num_images=len(data.dataset),
            columns=record["columns"], shards=[str(p.relative_to(out)) for p in paths],
            **channel_statistics(paths, vae.latent_channels),
            num_classes=data.num_classes, class_names=list(data.class_names) if data.class_names else None,
            source_key=data.key, data_args=source_args, command=command,
        )  # fmt: skip
        c, h, w = meta["latent_shape"]
        return (
            dataset_card(meta, paths),
            meta,
            f"wrote {len(data.dataset)} latents ({c}x{h}x{w}) in {len(paths)} shard(s) to {out}",
        )

    return describe


@cli_entry
def main(argv=None):
    data_args, args, out_args = parse_args((DataArguments, EncodeArguments, ShardedOutputArguments), argv,
                                           description=__doc__)  # fmt: skip
    validate(data_args, args, out_args)
    state = process_state()
    data_args = dataclasses.replace(data_args, center_crop=True)  # no random crops: a rerun gives the same latents
    data = load_train_data(data_args)
    vae_path = Path(args.vae).expanduser()
    vae_source = str(vae_path.resolve()) if vae_path.is_dir() else args.vae  # found again from any directory
    vae = load_vae(vae_source, state.device, DTYPES[args.dtype], args.vae_revision)
    check_fits(vae, data, data_args.resolution)
    columns = [*LATENT_COLUMNS, *(FLIP_COLUMNS if data_args.random_flip else ())]
    columns += ["label"] * (data.num_classes > 0) + ["caption"] * (data.captions is not None)
    record = dict(vae=vae_source, vae_revision=args.vae_revision, dtype=args.dtype, data=data.key,
                  resolution=data_args.resolution, num_images=len(data.dataset), shard_size=out_args.shard_size,
                  columns=columns)  # fmt: skip
    out = Path(out_args.output_dir)
    return write_sharded_dataset(
        FORMAT, state, out_args, record, len(data.dataset), shard_maker(vae, data, data_args, args),
        describer(vae, data, data_args, args, out, record), desc="encoding", argv=argv,
    )  # fmt: skip


if __name__ == "__main__":
    main()
