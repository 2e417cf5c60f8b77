"""Encode images once with a VAE into a latent dataset (each image's posterior mean and std) for latent diffusion;
clips (Moving Fashion-MNIST, or video files with --num_frames) are encoded frame by frame.

    python encode_latents.py --vae stabilityai/sd-vae-ft-ema --dataset_name fashion_mnist --output_dir latents/fm
    accelerate launch encode_latents.py --vae my_vae/ --train_data_dir images/ --resolution 256 --random_flip \\
        --output_dir latents/mine --push_to_hub --hub_dataset_id me/mine-latents
    accelerate launch train_cfm.py --latent_dataset latents/fm
    python encode_latents.py --vae my_vae/ --dataset_name moving_fashion_mnist --num_frames 8 --output_dir latents/mfm
    python encode_latents.py --vae my_vae/ --dataset_name captioned/ --text_encoder openai/clip-vit-large-patch14 \
        --output_dir latents/captioned   # captions' text embeddings stored too: training never runs the encoder

The dataset (format: modules/latents.py) keeps the images' order and is the same whatever the number of processes:
shard k is encoded by process k % num_processes and written whole or not at all. Rerunning with the same arguments
resumes, skipping finished shards; latents.json is written last, once every shard is whole. Images are always
center-cropped, so the encoding is deterministic; --random_flip also stores each image's flipped latents (a clip is
flipped whole), for the trainer to pick per step. With --text_encoder (a frozen one: a CLIP model or 'minilm') each
caption's embeddings are stored too, and training with the same --text_encoder reads them instead of loading the
encoder; with --repa_encoder, each image's (and flipped image's) features from a frozen vision encoder, for REPA
(docs/quality.md).
Every flag: python encode_latents.py --help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from modules.config import DataArguments, UserError, cli_entry, help_field, parse_args
from modules.data import latents
from modules.data.latents import (
    FLIP_COLUMNS,
    LATENT_COLUMNS,
    METADATA_FILE,
    REPA_COLUMNS,
    TEXT_COLUMNS,
    channel_statistics,
)
from modules.data.shards import (
    ShardedFormat,
    ShardedOutputArguments,
    card_header,
    process_state,
    write_sharded_dataset,
)
from modules.data.sources import load_train_data, with_clip_length
from modules.networks.text import load_text_encoder
from modules.networks.vae import load_vae
from modules.training.alignment import encoder_source, load_encoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT = ShardedFormat(
    script="encode_latents.py", what="latents", metadata_file=METADATA_FILE, args_file=".encode_args.json"
)


@dataclass
class EncodeArguments:
    vae: str = help_field(
        "The VAE: a Hub id (e.g. stabilityai/sd-vae-ft-ema, or a pipeline with vae/) or a local directory written by "
        "save_pretrained."
    )
    vae_revision: str | None = help_field("Hub revision (branch, tag or commit) of the VAE.", default=None)
    batch_size: int = help_field(
        "Images per VAE forward pass, per process (of clips, as many frames: at least one clip).", default=64
    )
    dtype: Literal["fp32", "fp16", "bf16"] = help_field(
        "Precision the VAE runs in; latents are stored as float16.", default="fp32"
    )
    text_encoder: str | None = help_field(
        "Also store each caption's text embeddings (float16) from this frozen encoder: 'minilm' or a CLIP model's "
        "Hub id or folder. Train with the same --text_encoder to use them.",
        default=None,
    )
    max_text_length: int | None = help_field(
        "Tokens per caption for --text_encoder (longer ones are truncated and counted).", default=None
    )
    repa_encoder: str | None = help_field(
        "Also store each image's features (float16) from this frozen vision encoder, for REPA (docs/quality.md): a "
        "transformers AutoModel id or folder with a patch grid (e.g. facebook/dinov2-base), or "
        "fashion_mnist_classifier. Training with the same --repa_encoder reads them and never runs the encoder.",
        default=None,
    )
    repa_grid: int | None = help_field(
        "--repa_encoder: the features' grid G (G x G per image), the token grid of the model to train or a whole "
        "multiple of it (a DiT's latent size / patch size). Default: the latent size / 2.",
        default=None,
    )


def validate(data_args: DataArguments, args: EncodeArguments, out_args: ShardedOutputArguments):
    for name, value in (("batch_size", args.batch_size), ("shard_size", out_args.shard_size)):
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if data_args.latent_dataset:
        raise UserError(
            "--latent_dataset is for training; encode_latents.py reads images (--dataset_name or --train_data_dir)"
        )
    spec = args.text_encoder or ""
    if spec == "own" or spec.startswith("own:"):
        raise UserError(
            f"--text_encoder {spec}: our own text encoder trains with the denoiser, so its embeddings cannot be "
            "stored; give a frozen one (a CLIP model or 'minilm'), or pass --text_encoder only to training"
        )
    if args.repa_grid is not None and (args.repa_grid < 1 or not args.repa_encoder):
        raise UserError(f"--repa_grid {args.repa_grid}: needs --repa_encoder and at least 1")
    if args.max_text_length is not None and (args.max_text_length < 2 or not args.text_encoder):
        raise UserError(f"--max_text_length {args.max_text_length}: needs --text_encoder and at least 2")


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
    vae, (c, h, w), frames = meta["vae"], meta["latent_shape"], meta.get("num_frames")
    shape, item = (f"({frames}, {c}, {h}, {w})", "clip") if frames else (f"({c}, {h}, {w})", "image")
    stats = "\n".join(
        f"| {i} | {m:.5g} | {s:.5g} |"
        for i, (m, s) in enumerate(zip(meta["channel_mean"], meta["channel_std"], strict=True))
    )
    columns = {
        "mean": f"posterior mean, float16 {shape}, raw (before any scaling)",
        "std": f"posterior std, float16 {shape}",
        "flip_mean": f"posterior mean of the horizontally flipped {item}",
        "flip_std": f"posterior std of the horizontally flipped {item}",
        "label": f"class label ({meta['num_classes']} classes)",
        "caption": f"text caption of the {item}",
        "text_tokens": "the caption's token embeddings (real tokens only), float16 (tokens, width)",
        "text_pooled": "the caption's pooled embedding, float16 (width,)",
    }
    if repa := meta.get("repa"):
        grid, dim, encoder = repa["grid"], repa["dim"], repa["encoder"]
        columns["repa_features"] = (
            f"{encoder}'s features of the {item} on a {grid}x{grid} grid, float16 ({grid}^2, {dim})"
        )
        columns["repa_flip_features"] = f"the same of the horizontally flipped {item}"
    rows = "\n".join(f"| {name} | {columns[name]} |" for name in meta["columns"])
    res = meta["image_resolution"]
    what = f"clips of {frames} frames" if frames else "images"
    summary = (
        f"{meta['num_images']} {what} of {meta['source']} at {res}x{res} pixels (center-cropped), encoded by the VAE "
        f"`{vae['source']}` ({vae['kind']}, {meta['vae_dtype']}, downsample factor {vae['downsample_factor']}) "
        f"{'frame by frame ' if frames else ''}into latents of shape {c}x{h}x{w}, in the {item}s' order, in "
        f"{len(meta['shards'])} shard(s)."
    )
    if meta.get("text_encoder"):
        text = meta["text_encoder"]
        summary += (
            f" Captions are encoded by the text encoder `{text['source']}` ({text['kind']}, at most "
            f"{text['max_length']} tokens; {meta['text_truncated']} caption(s) truncated)."
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


def shard_maker(vae, data, data_args: DataArguments, args: EncodeArguments, text=None, features=None):
    """`make_shard(rows, progress)`: the latents (and labels, captions, caption embeddings through the text encoder
    `text`, REPA `features`) of those images, as a pyarrow table."""

    batch_size = max(1, args.batch_size // data.num_frames) if data.num_frames else args.batch_size  # items

    def make_shard(rows: range, progress):
        shard = latents.encode_shard(
            *(vae, data.dataset, rows, batch_size, data_args.dataloader_num_workers, data_args.random_flip, progress),
            features=features,
        )
        if data.captions is not None:
            shard["caption"] = [str(data.captions[i]) for i in rows]
        if text is not None:
            shard.update(latents.encode_captions(text, shard["caption"], args.batch_size))
        return latents.latent_table(shard, data.class_names)

    return make_shard


def describer(vae, data, data_args: DataArguments, args: EncodeArguments, out: Path, record: dict, text=None):
    repa = record.get("repa")
    """`describe(shard_paths, command)`: the dataset card and latents.json, once every shard is whole."""

    def describe(paths, command: str):
        text_meta = {}
        if text is not None:
            null = latents.encode_captions(text, [""], 1)  # the empty caption: dropout's and guidance's condition
            text_meta = dict(
                text_encoder=text.config_record(),
                text_null={
                    "tokens": null["text_tokens"][0].astype(float).tolist(),
                    "pooled": null["text_pooled"][0].astype(float).tolist(),
                },
                text_truncated=truncated_captions(text, paths),
            )
        res, f = data_args.resolution, vae.downsample_factor
        source_args = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "latent_dataset"}  # for FID
        meta = dict(
            source=data_args.train_data_dir or f"{data_args.dataset_name} ({data_args.dataset_split} split)",
            vae=vae.config_record(),
            vae_dtype=args.dtype,
            image_resolution=res,
            image_channels=data.num_channels,
            latent_shape=[vae.latent_channels, res // f, res // f],  # of each frame, for clips
            **({"num_frames": data.num_frames} if data.num_frames else {}),
            num_images=len(data.dataset),
            columns=record["columns"],
            shards=[str(p.relative_to(out)) for p in paths],
            **channel_statistics(paths, vae.latent_channels),
            num_classes=data.num_classes,
            class_names=list(data.class_names) if data.class_names else None,
            source_key=data.key,
            data_args=source_args,
            command=command,
            **text_meta,
            **({"repa": repa} if repa else {}),
        )
        shape = "x".join(map(str, [*([data.num_frames] if data.num_frames else []), *meta["latent_shape"]]))
        return (
            dataset_card(meta, paths),
            meta,
            f"wrote {len(data.dataset)} latents ({shape}) in {len(paths)} shard(s) to {out}",
        )

    return describe


def truncated_captions(text, paths) -> int:
    """How many stored captions the text encoder truncated: those whose token count reached its max_length and whose
    text, tokenized without a limit, is longer (counted over every shard, whichever process encoded it)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    full = []
    for path in paths:
        table = pq.read_table(path, columns=["caption", "text_tokens"])
        at_limit = pc.equal(pc.list_value_length(table.column("text_tokens")), text.max_length)
        full += table.filter(at_limit).column("caption").to_pylist()
    return text.tokenize(full)[2] if full else 0


def repa_features(args: EncodeArguments, data, device, latent_size: int):
    """(images -> float16 features (N, G*G, D), the record {"encoder", "grid", "dim"}) for --repa_encoder, or
    (None, None)."""
    if not args.repa_encoder:
        return None, None
    if data.num_frames:
        raise UserError("--repa_encoder stores features of images for REPA; the data are clips")
    grid = args.repa_grid or max(1, latent_size // 2)
    source = encoder_source(args.repa_encoder)
    encoder = load_encoder(source, device)
    return (
        lambda images: encoder(images, grid).to(torch.float16),
        {"encoder": source, "grid": grid, "dim": encoder.dim(grid)},
    )


@cli_entry
def main(argv=None):
    data_args, args, out_args = parse_args(
        (DataArguments, EncodeArguments, ShardedOutputArguments), argv, description=__doc__
    )
    validate(data_args, args, out_args)
    state = process_state()
    data_args = dataclasses.replace(data_args, center_crop=True)  # no random crops: a rerun gives the same latents
    data_args = with_clip_length(data_args, False)  # recorded with its clip length, to find the clips again
    data = load_train_data(data_args)
    vae_path = Path(args.vae).expanduser()
    vae_source = str(vae_path.resolve()) if vae_path.is_dir() else args.vae  # found again from any directory
    vae = load_vae(vae_source, state.device, DTYPES[args.dtype], args.vae_revision)
    check_fits(vae, data, data_args.resolution)
    text = None
    if args.text_encoder:
        if data.captions is None:
            raise UserError(
                "--text_encoder needs captions, but the images have none: pass --caption_column, or make them with "
                "caption.py"
            )
        text = load_text_encoder(args.text_encoder, state.device, DTYPES[args.dtype], args.max_text_length)
    columns = [*LATENT_COLUMNS, *(FLIP_COLUMNS if data_args.random_flip else ())]
    columns += ["label"] * (data.num_classes > 0) + ["caption"] * (data.captions is not None)
    columns += list(TEXT_COLUMNS) * (text is not None)
    features, repa = repa_features(args, data, state.device, data_args.resolution // vae.downsample_factor)
    columns += list(REPA_COLUMNS[: 1 + data_args.random_flip]) * (features is not None)
    record = dict(
        vae=vae_source,
        vae_revision=args.vae_revision,
        dtype=args.dtype,
        data=data.key,
        resolution=data_args.resolution,
        num_images=len(data.dataset),
        shard_size=out_args.shard_size,
        columns=columns,
        **({"text_encoder": text.config_record()} if text else {}),
        **({"repa": repa} if repa else {}),
    )
    out = Path(out_args.output_dir)
    return write_sharded_dataset(
        FORMAT,
        state,
        out_args,
        record,
        len(data.dataset),
        shard_maker(vae, data, data_args, args, text, features),
        describer(vae, data, data_args, args, out, record, text),
        desc="encoding",
        argv=argv,
    )


if __name__ == "__main__":
    main()
