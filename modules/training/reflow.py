"""A reflow student's data: the pairs its teacher made (modules/data/pairs.py), checked against the flags that would
break the pairing and against the model the student starts from (--init_from), with the teacher's training images for
FID and what the student records of its teacher."""

from __future__ import annotations

import json

from modules.artifacts.model_folder import model_dir
from modules.config import DataArguments, ModelArguments, TrainingArguments, UserError
from modules.data.images import labels_needed
from modules.data.pairs import PairsData, load_pairs_data
from modules.data.sources import reference_images
from modules.records import OBJECTIVE_FILE, from_dict
from modules.training.run import RunData


def open_pairs(data_args: DataArguments, model_args: ModelArguments, train_args: TrainingArguments) -> RunData:
    """A reflow student's data (modules/data/pairs.py): the pairs, their last ones held out for the validation loss
    (--validation_split auto), the teacher's training images for FID, the teacher's latent record for a latent
    teacher, and what the student records of its teacher. Flags that would break the pairing are refused, and the
    pairs are checked against --resolution, --num_frames, the condition flags and --init_from."""
    source, split = data_args.pairs_dataset, data_args.validation_split
    if data_args.latent_dataset:
        raise UserError("--pairs_dataset and --latent_dataset: give one (a latent teacher's pairs hold its latents)")
    if data_args.random_flip:
        raise UserError(
            "--random_flip: a flipped sample is no longer what the teacher made from its noise; train on "
            "--pairs_dataset without it"
        )
    if split not in (None, "none", "auto"):
        raise UserError(
            f"--validation_split '{split}': a pairs dataset holds out its own last pairs ('auto'), or none ('none')"
        )
    validation = data_args.validation_samples if split == "auto" else 0
    pairs, held_out = load_pairs_data(source, data_args.max_train_samples, validation)
    check_pairs(pairs, data_args, model_args)
    if model_args.init_from:
        check_student(pairs, source, model_args, train_args.hub_token)
    meta = pairs.metadata
    reference = None
    if train_args.fid_num_samples or train_args.eval_fid_steps:
        recorded = meta.get("source_data_args")
        reference = reference_images(recorded and from_dict(DataArguments, recorded), f"pairs dataset '{source}'")
    keys = ("teacher", "sampler", "num_inference_steps", "guidance_scale", "seed", "source_data_args")
    reflow = {"pairs_dataset": source, **{k: meta.get(k) for k in keys}}
    return RunData(pairs, held_out, reference, meta.get("latent"), reflow)


def check_pairs(pairs: PairsData, data_args: DataArguments, model_args: ModelArguments):
    """The flags against what the pairs were made at: their image size, clip length and condition."""
    meta, source = pairs.metadata, data_args.pairs_dataset
    size = meta["image_resolution"]
    if data_args.resolution != size:
        raise UserError(
            f"--resolution {data_args.resolution}: the pairs dataset '{source}' was made at {size}x{size} "
            f"(samples {'x'.join(map(str, meta['shape']))}); pass --resolution {size}"
        )
    if data_args.num_frames is not None and data_args.num_frames != pairs.num_frames:
        held = f"clips of {pairs.num_frames} frames" if pairs.num_frames else "images"
        raise UserError(f"--num_frames {data_args.num_frames}: the pairs dataset '{source}' holds {held}")
    text = meta["conditioning"] == "text"
    if text and not model_args.text_encoder:
        teacher = (meta.get("text_encoder") or {}).get("source", "?")
        raise UserError(
            f"the pairs dataset '{source}' holds captions (its teacher's text encoder: {teacher}): pass the "
            "teacher's --text_encoder"
        )
    if model_args.class_conditional and not pairs.num_classes:
        raise labels_needed(f"the pairs dataset '{source}' ({describe_condition(meta)})")
    if model_args.text_encoder and not text:
        raise UserError(f"--text_encoder: the pairs dataset '{source}' holds no captions ({describe_condition(meta)})")


def describe_condition(record: dict) -> str:
    """What a model (its objective.json and config.json as one dict) or a pairs dataset is conditioned on."""
    if record.get("text_encoder") or record.get("conditioning") == "text":
        return "text-conditional"
    classes = record.get("num_classes") or 0
    return f"class-conditional on {classes} classes" if classes else "unconditional"


def check_student(pairs: PairsData, source: str, model_args: ModelArguments, token: str | None):
    """The --init_from model (one of ours: a diffusers checkpoint is checked by `fit_pretrained`) takes the pairs'
    samples and conditions: the same clip length, input shape and condition."""
    folder = model_dir(model_args.init_from, model_args.init_from_revision, token)
    if not (folder / OBJECTIVE_FILE).is_file() or not (folder / "config.json").is_file():
        return
    student = {**json.loads((folder / OBJECTIVE_FILE).read_text()), **json.loads((folder / "config.json").read_text())}
    takes = (student.get("num_frames") or 0, student.get("in_channels"), student.get("sample_size"))
    holds = (pairs.num_frames, pairs.num_channels, pairs.resolution)
    if takes != holds:
        raise UserError(
            f"--pairs_dataset '{source}' holds {shape_text(holds)} samples, but --init_from '{model_args.init_from}' "
            f"takes {shape_text(takes)} inputs; make the pairs with it (sample.py --model {model_args.init_from} "
            "--output_pairs)"
        )
    if describe_condition(student) != describe_condition(pairs.metadata):
        raise UserError(
            f"--pairs_dataset '{source}' is {describe_condition(pairs.metadata)}, but --init_from "
            f"'{model_args.init_from}' is {describe_condition(student)}"
        )


def shape_text(frames_channels_size: tuple) -> str:
    """(F, C, S) as 'FxCxSxS', or 'CxSxS' without frames (F = 0)."""
    frames, channels, size = frames_channels_size
    return "x".join(str(d) for d in ((frames,) if frames else ()) + (channels, size, size))
