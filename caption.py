"""Caption images into a dataset: the source's columns plus "caption", by a vision-language model or a template.

    python caption.py --captioner blip2 --train_data_dir images/ --output_dir data/captioned
    accelerate launch caption.py --captioner paligemma --dataset_name user/images --output_dir data/pg \\
        --push_to_hub --hub_dataset_id me/images-captioned
    python caption.py --captioner template --template "a photo of a {label}|a {label}, product photo" \\
        --dataset_name fashion_mnist --output_dir data/fashion_mnist_captions
    accelerate launch train_cfm.py --dataset_name data/captioned --caption_column caption ...

--captioner is blip2 (Salesforce/blip2-opt-2.7b), paligemma (google/paligemma2-3b-pt-224, prompt "caption en"),
template, or any image-text-to-text model (a Hub id or a directory); --captioner_id replaces the model of blip2 and
paligemma. Decoding is greedy unless --num_beams, so captions are reproducible. A template caption names the image's
class: {label} becomes its class name in lower case, '/' read as 'or' ("T-shirt/top" -> "t-shirt or top"); with
several templates (--template given several times, or '|'-separated) each image gets one chosen from (--seed, index).

The output directory (and, with --push_to_hub, the Hub dataset repo) is what `datasets.load_dataset` and
--dataset_name read: data/train-XXXXX-of-NNNNN.parquet, the source's rows in order with its columns (images as
datasets.Image; Fashion-MNIST: its 28x28 PNGs and labels; an image folder: the files, their file_name, labels and
metadata.jsonl's columns; a source column named caption is kept as original_caption) plus "caption"; README.md, the
dataset card; captions.json, written last, once every shard is whole. Shard k is captioned by process
k % num_processes, so any number of processes gives the same dataset; a rerun with the same arguments resumes,
skipping finished shards. Images are stored as they are (--resolution does not apply: the captioner's processor
resizes them). Every flag: python caption.py --help.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modules.config import DataArguments, UserError, cli_entry, help_field, parse_args
from modules.data.captioning import (
    NAMED_CAPTIONERS,
    ORIGINAL_CAPTION,
    TemplateCaptioner,
    caption_rows,
    caption_table,
    load_captioner,
    open_image_rows,
    parse_templates,
)
from modules.data.shards import (
    ShardedFormat,
    ShardedOutputArguments,
    card_header,
    card_sections,
    process_state,
    write_sharded_dataset,
)

FORMAT = ShardedFormat(
    script="caption.py", what="captions", metadata_file="captions.json", args_file=".caption_args.json"
)


class _AddUp(argparse.Action):
    """A flag given several times adds up its values; its first use on the command line replaces a recipe's."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given_on_command_line", set())
        before = getattr(namespace, self.dest) if self.dest in given else []
        setattr(namespace, self.dest, [*before, *values])
        namespace._given_on_command_line = given | {self.dest}


@dataclass
class CaptionArguments:
    captioner: str = help_field(
        "blip2, paligemma, template, or the Hub id or local directory of another image-text-to-text model.",
        default="blip2",
    )
    captioner_id: str | None = help_field(
        "The model of --captioner blip2 or paligemma instead of its default (Salesforce/blip2-opt-2.7b, "
        "google/paligemma2-3b-pt-224): a Hub id or a local directory.",
        default=None,
    )
    captioner_revision: str | None = help_field("Hub revision (branch, tag or commit) of the captioner.", default=None)
    prompt: str | None = help_field(
        "Text given to the model with each image, cut from its captions. Default: 'caption en' for PaliGemma, none "
        "for BLIP-2 (a prompt there is a prefix it continues, e.g. 'a photo of') and other models.",
        default=None,
    )
    template: list[str] | None = field(
        default=None,
        metadata={
            "help": "--captioner template: caption text with {label} for the class name, e.g. 'a photo of a {label}'. "
            "Several (given several times, or separated by '|') are variants, one chosen per image.",
            "action": _AddUp,
        },
    )
    seed: int = help_field("Seed of the choice among several templates.", default=0)
    max_new_tokens: int = help_field("Longest caption, in tokens.", default=30)
    num_beams: int = help_field("Beam search with this many beams (1: greedy).", default=1)
    batch_size: int = help_field("Images per generate call, per process.", default=16)
    torch_dtype: Literal["bf16", "fp16", "fp32"] | None = help_field(
        "Precision the model runs in. Default: bf16 on GPUs (fp16 where bf16 is not supported), fp32 on CPUs.",
        default=None,
    )
    trust_remote_code: bool = help_field(
        "Allow a captioner whose Hub repo ships its own modelling code.", default=False
    )


def validate(data_args: DataArguments, args: CaptionArguments, out_args: ShardedOutputArguments) -> list[str] | None:
    """Check the flags; returns the templates of --captioner template."""
    for name, value in (
        ("batch_size", args.batch_size),
        ("shard_size", out_args.shard_size),
        ("max_new_tokens", args.max_new_tokens),
        ("num_beams", args.num_beams),
    ):
        if value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if args.seed < 0:
        raise UserError(f"--seed must be non-negative, got {args.seed}")
    if data_args.latent_dataset:
        raise UserError(
            "--latent_dataset is for training; caption.py reads images (--dataset_name or --train_data_dir)"
        )
    if args.captioner_id and args.captioner not in NAMED_CAPTIONERS:
        raise UserError(
            f"--captioner_id is for --captioner {' or '.join(NAMED_CAPTIONERS)}; give the model itself as "
            f"--captioner {args.captioner_id}"
        )
    if args.captioner != "template":
        if args.template:
            raise UserError(f"--template is for --captioner template, not --captioner {args.captioner}")
        return None
    if args.prompt is not None:
        raise UserError("--prompt is for model captioners; --captioner template writes --template")
    return parse_templates([args.template] if isinstance(args.template, str) else args.template or [])


def open_captioner(args: CaptionArguments, rows, templates, device):
    if templates is None:
        return load_captioner(
            args.captioner,
            args.captioner_id,
            prompt=args.prompt,
            dtype=args.torch_dtype,
            device=device,
            revision=args.captioner_revision,
            trust_remote_code=args.trust_remote_code,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
        )
    if rows.labels is None:
        raise UserError(
            "--captioner template writes class names, but the images have no labels (pass --label_column, or a "
            "folder with one subfolder per class)"
        )
    return TemplateCaptioner(templates, rows.data.class_names, args.seed)


def source_name(data_args: DataArguments) -> str:
    return data_args.train_data_dir or f"{data_args.dataset_name} ({data_args.dataset_split} split)"


def column_content(name: str, feature) -> str:
    if name in ("caption", ORIGINAL_CAPTION):
        return "the caption written by caption.py" if name == "caption" else "the source's own 'caption'"
    if hasattr(feature, "num_classes"):
        return f"class label ({feature.num_classes} classes)"
    return f"from the source ({getattr(feature, 'dtype', type(feature).__name__.lower())})"


def dataset_card(meta: dict, features, paths) -> str:
    captioner = meta["captioner"]
    if captioner["kind"] == "template":
        by = "templates (chosen per image from seed {seed}): {templates}".format(
            seed=captioner["seed"], templates=", ".join(f"`{t}`" for t in captioner["templates"])
        )
    else:
        decoding = "greedy" if captioner["num_beams"] == 1 else f"beam search ({captioner['num_beams']} beams)"
        prompt = f"prompt `{captioner['prompt']}`" if captioner["prompt"] else "no prompt"
        by = (
            f"the {captioner['model_type']} model `{captioner['model']}` ({prompt}, {decoding} decoding, at most "
            f"{captioner['max_new_tokens']} new tokens, {captioner['dtype']})"
        )
    columns = {name: column_content(name, feature) for name, feature in features.items()}
    empty = f" {meta['num_empty_captions']} captions are empty." if meta["num_empty_captions"] else ""
    header = card_header(f"Captions of {meta['source']}", ["image", "captions", "text-to-image"], paths)
    return f"""{header}# Captions of {meta["source"]}

{meta["num_images"]} images of {meta["source"]}, in their order, in {len(meta["shards"])} shard(s), each captioned by
{by}.{empty}

{card_sections(columns, meta["command"])}
Load it with `datasets.load_dataset("<this directory or repo id>")`, or train on it with
`--dataset_name <this directory or repo id> --caption_column caption`. captions.json holds the same facts.
"""


def describer(rows, captioner, data_args: DataArguments, record: dict, out: Path):
    """`describe(shard_paths, command)`: the dataset card and captions.json, once every shard is whole."""
    import pyarrow.parquet as pq

    def describe(paths, command: str):
        captions = [c for p in paths for c in pq.read_table(p, columns=["caption"]).column("caption").to_pylist()]
        empty = sum(not c for c in captions)
        if empty:
            print(f"warning: the captioner gave {empty} empty captions (of {len(captions)})", file=sys.stderr)
        meta = dict(
            source=source_name(data_args),
            captioner=captioner.record(),
            num_images=len(rows),
            num_empty_captions=empty,
            columns=record["columns"],
            class_names=list(rows.data.class_names) if rows.data.class_names else None,
            shards=[str(p.relative_to(out)) for p in paths],
            source_key=rows.data.key,
            data_args=dataclasses.asdict(data_args),
            command=command,
        )
        summary = f"wrote {len(rows)} captioned images in {len(paths)} shard(s) to {out}"
        return dataset_card(meta, rows.output_features, paths), meta, summary

    return describe


@cli_entry
def main(argv=None):
    data_args, args, out_args = parse_args(
        (DataArguments, CaptionArguments, ShardedOutputArguments),
        argv,
        defaults=dict(shard_size=1000),
        description=__doc__,
    )
    templates = validate(data_args, args, out_args)
    state = process_state()
    rows = open_image_rows(data_args)
    captioner = open_captioner(args, rows, templates, state.device)
    record = dict(
        captioner=captioner.record(),
        data=rows.data.key,
        num_images=len(rows),
        shard_size=out_args.shard_size,
        columns=list(rows.output_features),
    )
    out = Path(out_args.output_dir)

    def make_shard(indices: range, progress):
        captions = caption_rows(captioner, rows, indices, args.batch_size, data_args.dataloader_num_workers, progress)
        return caption_table(rows, indices, captions)

    describe = describer(rows, captioner, data_args, record, out)
    return write_sharded_dataset(FORMAT, state, out_args, record, len(rows), make_shard, describe, "captioning", argv)


if __name__ == "__main__":
    main()
