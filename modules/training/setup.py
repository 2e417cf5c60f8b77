"""Everything a run needs before its first step that can fail on bad input: the checks of the arguments and the
data opened (images or latents, held-out and FID reference sets)."""

from __future__ import annotations

import warnings
from pathlib import Path

from modules.config import DataArguments, ModelArguments, TrainingArguments, UserError
from modules.data.images import load_train_data, load_validation_data
from modules.data.latents import load_latent_data
from modules.evaluation.fid import check_inception_weights
from modules.evaluation.metrics import parse_eval_metrics
from modules.records import from_dict

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("none", "tensorboard", "wandb", "all")


def validate(train: TrainingArguments, objective_args):
    """Check values that would otherwise fail late or silently; each error names the flag and its value."""
    positive = {
        "train_batch_size": train.train_batch_size,
        "max_train_steps": train.max_train_steps,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
    }
    if hasattr(objective_args, "num_inference_steps"):  # objectives that sample
        positive["num_inference_steps"] = objective_args.num_inference_steps
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name} must be positive, got {value}")
    for name in (
        "lr_warmup_steps",
        "sample_steps",
        "checkpointing_steps",
        "logging_steps",
        "max_grad_norm",
        "fid_num_samples",
        "fid_reference_samples",
        "adam_weight_decay",
    ):
        if getattr(train, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(train, name)}")
    if train.max_nonfinite_steps < 1:
        raise UserError(f"--max_nonfinite_steps must be at least 1, got {train.max_nonfinite_steps}")
    if train.max_train_minutes is not None and not train.max_train_minutes > 0:
        raise UserError(f"--max_train_minutes must be positive, got {train.max_train_minutes}")
    if not 0.0 <= train.cond_drop_prob <= 1.0:
        raise UserError(f"--cond_drop_prob must be in [0, 1], got {train.cond_drop_prob}")
    if not 0.0 <= train.ema_max_decay < 1.0:
        raise UserError(f"--ema_max_decay must be in [0, 1), got {train.ema_max_decay}")
    if getattr(objective_args, "guidance_scale", 0) < 0:
        raise UserError(f"--guidance_scale must be >= 0, got {objective_args.guidance_scale}")
    if train.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"--lr_scheduler '{train.lr_scheduler}' is not one of {', '.join(LR_SCHEDULERS)}")
    if train.report_to not in TRACKERS:
        raise UserError(f"--report_to '{train.report_to}' is not one of {', '.join(TRACKERS)}")

    try:
        wanted = parse_eval_metrics(train.eval_metrics)
    except ValueError as e:
        raise UserError(f"--eval_metrics: {e}") from None
    if train.fid_weights and (train.fid_num_samples or train.eval_fid_steps) and {"fid", "kid"} & set(wanted):
        try:
            check_inception_weights(train.fid_weights)
        except ValueError as e:
            raise UserError(f"--fid_weights: {e}") from None
    if train.checkpoints_total_limit is not None and train.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit must be >= 1, got {train.checkpoints_total_limit}")


def open_data(data_args: DataArguments, model_args: ModelArguments, train_args: TrainingArguments):
    """(training data, held-out data or None, FID reference data or None, latent record or None).

    For a latent dataset the FID reference is the image dataset it was encoded from (recorded in it), and the
    latent record (VAE, channel statistics) is what decodes the model's samples; it has no held-out split."""
    need_labels = model_args.class_conditional
    if model_args.text_encoder and model_args.class_conditional:
        raise UserError("--text_encoder and --class_conditional: choose one condition (captions or class labels)")
    fid = train_args.fid_num_samples or train_args.eval_fid_steps
    if not data_args.latent_dataset:
        data = load_train_data(data_args, need_labels=need_labels)
        held_out = load_validation_data(data_args) if train_args.validation_steps else None
        if model_args.text_encoder and data.captions is None:
            raise UserError(
                "--text_encoder needs captions, but the data has none: pass --caption_column, or make them with "
                "caption.py (e.g. --captioner template for labelled data)"
            )
        if model_args.text_encoder and held_out is not None and held_out.captions is None:
            warnings.warn("the held-out split has no captions: no validation loss for a text model", stacklevel=2)
            held_out = None
        return data, held_out, data if fid else None, None
    import dataclasses

    data = load_latent_data(data_args.latent_dataset, data_args.max_train_samples, need_labels=need_labels)
    if model_args.text_encoder and data.captions is None:
        raise UserError(
            f"--text_encoder needs captions, but the latent dataset '{data_args.latent_dataset}' has none: encode a "
            "captioned dataset (caption.py, then encode_latents.py --caption_column caption)"
        )
    if data_args.random_flip and "flip_mean" not in data.metadata["columns"]:
        raise UserError(
            f"--random_flip: the latent dataset '{data_args.latent_dataset}' holds no flipped latents; encode it with "
            "encode_latents.py --random_flip, or train without --random_flip"
        )
    vae = dict(data.vae, source=model_args.vae or data.vae["source"])
    if Path(vae["source"]).exists():  # a local VAE: found again from any working directory
        vae["source"] = str(Path(vae["source"]).resolve())
    if data_args.resolution != data.image_resolution:
        held = f"{data.image_resolution}px images as {data.resolution}x{data.resolution} latents"
        warnings.warn(
            f"--resolution {data_args.resolution} is not used: the latent dataset holds {held}", stacklevel=2
        )
    source = dataclasses.replace(from_dict(DataArguments, data.metadata.get("data_args") or {}), latent_dataset=None)
    latent = {
        "dataset": data_args.latent_dataset,
        "vae": vae,
        "channel_mean": data.channel_mean.tolist(),
        "channel_std": data.channel_std.tolist(),
        "image_resolution": data.image_resolution,
        "source_data_args": dataclasses.asdict(source),
    }
    reference = None
    if fid:
        try:
            reference = load_train_data(source)
        except UserError as e:
            raise UserError(
                f"FID of latent dataset '{data_args.latent_dataset}' needs the images it was encoded from, which "
                f"failed to open ({e}); pass --fid_num_samples 0"
            ) from None
    return data, None, reference, latent
