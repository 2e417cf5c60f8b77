"""Everything a run does before its first step, in order: check the arguments, open the data, build the model
(from seed `--seed`, the same on every process), start Accelerate, write the run record, prepare model, optimizer,
schedule and EMA, resume from a checkpoint, and open the data loader and the logs. Whatever can fail on bad input
fails before the run directory is touched."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from modules.artifacts.hub import HubPusher, check_push, push_later
from modules.artifacts.model_folder import load_pretrained_network, load_pretrained_weights
from modules.artifacts.phema import parse_stds
from modules.config import DataArguments, ModelArguments, TrainingArguments, UserError, warn
from modules.data.batches import WithIndex, model_input, train_loader
from modules.data.conditions import ConditionSource
from modules.data.latents import LatentData, latent_decoder, load_latent_data
from modules.data.order import ResumableBatchSampler
from modules.data.sources import load_train_data, load_validation_data, reference_images, with_clip_length
from modules.evaluation.fid import check_inception_weights
from modules.evaluation.metrics import classifier_measures, parse_eval_metrics
from modules.files import write_text_atomically
from modules.networks.diffusers_models import DiffusersDenoiser
from modules.networks.presets import is_video_model
from modules.networks.text import TextConditioner, load_text_encoder, stored_text_matches
from modules.objectives.protocol import Objective
from modules.records import RUN_CONFIG_FILE, command_line, from_dict, to_dict
from modules.training.alignment import make_alignment
from modules.training.checkpoint import check_compatible, load_checkpoint, resolve_resume
from modules.training.ema import EMA
from modules.training.flops import model_flops_per_image, peak_tflops
from modules.training.reflow import open_pairs
from modules.training.remote import fetch, parse_reference
from modules.training.run import Run, RunData
from modules.training.stopping import NonFiniteGuard, StopRequest
from modules.training.tracking import (
    TRACKERS,
    LogWindow,
    MetricsLog,
    end_mlflow_run_on_error,
    hide_password,
    mlflow_params,
    mlflow_store,
    resolve_trackers,
    tracker_settings,
)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def setup_run(
    script: str,
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainingArguments,
    objective: Objective,
    argv,
    stop_request: StopRequest,
    cleanup: contextlib.ExitStack,
) -> Run:
    """The run, ready for its first step (`run.start_step`). `cleanup` closes the progress bar on the way out."""
    out = Path(train_args.output_dir)
    trackers = resolve_trackers(train_args.report_to, out)
    data_args = with_clip_length(data_args, is_video_model(model_args.model))  # recorded with its clip length
    if data_args.pairs_dataset and (why := objective.refuses_pairs()):
        raise UserError(f"--pairs_dataset: {why}")
    data = open_data(data_args, model_args, train_args)
    if data.latent is not None or data_args.pairs_dataset:  # recorded with the clip length the data was made with
        data_args = dataclasses.replace(data_args, num_frames=data.train.num_frames or None)
    check_evaluation(train_args, data)
    model_args, condition = resolve_class_conditional(model_args, data.train)
    num_classes = data.train.num_classes if model_args.class_conditional else 0
    text = text_conditioner(model_args, data.train)
    resolution = data.train.resolution if data.latent else data_args.resolution
    torch.manual_seed(train_args.seed)  # same initial weights on every process
    model, objective, num_classes = build_network(
        objective, model_args, train_args, data, resolution, num_classes, text
    )
    accelerator = make_accelerator(train_args, out, trackers, objective)
    sharding = weight_sharding(accelerator)
    alignment = make_alignment(train_args, model, objective, data, accelerator.device, sharding)
    resume = find_resume(train_args, out, accelerator, model)
    device, world = accelerator.device, accelerator.num_processes
    decode = None
    if data.latent is not None and accelerator.is_main_process:  # before the run dir: a VAE that does not fit stops
        decode = latent_decoder(data.latent, device)
    if train_args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sampler = ResumableBatchSampler(
        len(data.train.dataset), train_args.train_batch_size, train_args.seed, accelerator.process_index, world
    )
    record = run_record(script, argv, data_args, model_args, train_args, objective)
    pusher = start_run_dir(record, train_args, accelerator)
    if train_args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    null_label = model.config.get("num_classes", num_classes)  # the data's number of classes, or a pretrained model's
    conditions = ConditionSource(
        data.train, num_classes, text.to(device) if text else None, train_args.cond_drop_prob, null_label
    )
    run = Run(
        data_args=data_args,
        model_args=model_args,
        train_args=train_args,
        objective=objective,
        data=data,
        conditions=conditions,
        stop_request=stop_request,
        accelerator=accelerator,
        model=model,
        optimizer=None,
        out=out,
        shape=sample_shape(data.train, resolution),
        decode=decode,
        pusher=pusher,
        text=text,
        condition=condition,
        alignment=alignment,
        images_per_step=train_args.train_batch_size * world * train_args.gradient_accumulation_steps,
    )
    run.flops_per_image = measure_flops(model.to(device), objective, data.train, conditions, device)
    run.peak_tflops = train_args.peak_tflops or peak_tflops(device, accelerator.mixed_precision)
    prepare_training(run)
    if resume is not None:
        resume_from(run, resume)
    start_batches(run, sampler)
    start_logging(run, record, trackers, cleanup)
    return run


def start_batches(run: Run, sampler: ResumableBatchSampler):
    """The run's batches from its start step on (the sampler skips exactly what an earlier run consumed)."""
    sampler.start_batch = run.start_step * run.train_args.gradient_accumulation_steps
    loader = train_loader(
        run.data.train.dataset,
        sampler,
        run.train_args.seed,
        run.data_args.dataloader_num_workers,
        with_index=run.text is not None,
        pin_memory=run.accelerator.device.type == "cuda",
    )
    run.batches = iter(loader)


def sample_shape(data, resolution: int) -> tuple[int, ...]:
    """The shape of one sample the model generates: (C, H, W), or (F, C, H, W) for clips."""
    image = (data.num_channels, resolution, resolution)
    return (data.num_frames, *image) if data.num_frames else image


def check_training_arguments(train: TrainingArguments):
    """Check values that would otherwise fail late or silently; each error names the flag and its value. (The
    objective checks its own settings when it is made.)"""
    positive = {
        "train_batch_size": train.train_batch_size,
        "max_train_steps": train.max_train_steps,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.learning_rate,
    }
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
    if train.ema_phema_stds is not None or train.ema_snapshot_steps:
        stds = parse_stds(train.ema_phema_stds or "", "--ema_phema_stds")
        if len(set(stds)) < 2 or train.ema_snapshot_steps <= 0:
            raise UserError(
                f"post-hoc EMA needs two or more distinct --ema_phema_stds and --ema_snapshot_steps > 0, got "
                f"'{train.ema_phema_stds}' and {train.ema_snapshot_steps}"
            )
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
    if train.wandb_log_checkpoints and train.report_to not in ("wandb", "all"):
        raise UserError(f"--wandb_log_checkpoints needs --report_to wandb (or all), got --report_to {train.report_to}")
    parse_reference(train.resume_from_checkpoint)  # a malformed hub: or wandb: reference fails now


def open_data(data_args: DataArguments, model_args: ModelArguments, train_args: TrainingArguments) -> RunData:
    """The training data, the held-out data (or None), the FID reference data (or None) and for a latent dataset
    the record that decodes its latents (or None).

    For a latent dataset the FID reference is the image dataset it was encoded from (recorded in it), and the
    latent record (VAE, channel statistics) is what decodes the model's samples; it has no held-out split."""
    need_labels = model_args.class_conditional is True  # auto (None) decides once the data is open
    if model_args.text_encoder and need_labels:
        raise UserError(
            "--text_encoder and --class_conditional true: choose one condition (captions or class labels); for "
            "captions pass --class_conditional false (or leave it unset: auto)"
        )
    fid = train_args.fid_num_samples or train_args.eval_fid_steps
    if data_args.pairs_dataset:
        return open_pairs(data_args, model_args, train_args)
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
        return RunData(data, held_out, data if fid else None)
    data = load_latent_data(data_args.latent_dataset, data_args.max_train_samples, need_labels=need_labels)
    if data_args.num_frames is not None and data_args.num_frames != data.num_frames:
        held = f"clips of {data.num_frames} frames" if data.num_frames else "images"
        raise UserError(
            f"--num_frames {data_args.num_frames}: the latent dataset '{data_args.latent_dataset}' holds {held}; "
            "leave --num_frames out (a latent dataset's clip length is the one encode_latents.py encoded)"
        )
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
    reference = reference_images(source, f"latent dataset '{data_args.latent_dataset}'") if fid else None
    return RunData(data, None, reference, latent)


def resolve_class_conditional(model_args: ModelArguments, data) -> tuple[ModelArguments, str]:
    """`model_args` with --class_conditional decided for the training data `data`, and what the model is
    conditioned on, as the start-up line says it.

    Auto (None) is on when the data has labels and the model is not conditioned on captions (--text_encoder);
    true on data without labels stopped when the data opened. The run records the decided value, and a resumed run
    decides the same from the same data (its checkpoint's num_classes would refuse other data)."""
    asked = model_args.class_conditional
    on = asked if asked is not None else bool(data.num_classes) and not model_args.text_encoder
    if model_args.text_encoder:
        condition, why = "text-conditional", "off with --text_encoder"
    elif on:
        condition, why = f"class-conditional on {data.num_classes} classes", "the data has labels"
    else:
        condition, why = "unconditional", "the data has no labels"
    if asked is None:
        condition += f" (--class_conditional auto: {why})"
    return dataclasses.replace(model_args, class_conditional=on), condition


def check_evaluation(train_args: TrainingArguments, data: RunData):
    """The FID settings against the data they need."""
    n_ref = train_args.fid_reference_samples or train_args.fid_num_samples
    if data.reference is not None and n_ref > len(data.reference.dataset):
        raise UserError(
            f"--fid_reference_samples {n_ref} is more than the {len(data.reference.dataset)} training images; lower "
            "it (or --fid_num_samples, which it defaults to)"
        )
    if train_args.fid_num_samples == 1:
        raise UserError("--fid_num_samples 1: a covariance needs at least 2 images")
    if "classifier" in train_args.eval_metrics and not classifier_measures((data.reference or data.train).key):
        raise UserError("--eval_metrics classifier is trained on Fashion-MNIST and only measures Fashion-MNIST runs")


def text_conditioner(model_args: ModelArguments, data) -> TextConditioner | None:
    """The captions' encoder of a text model: the embeddings a latent dataset stores for the same encoder, else
    --text_encoder itself."""
    if not model_args.text_encoder:
        return None
    if model_args.max_text_length is not None and model_args.max_text_length < 2:
        raise UserError(f"--max_text_length must be at least 2, got {model_args.max_text_length}")
    stored = data.text_encoder if isinstance(data, LatentData) else None
    if stored and stored_text_matches(stored, model_args.text_encoder, model_args.max_text_length):
        return TextConditioner.from_stored(stored, data.text_embeddings(), model_args.text_conditioning)
    if stored:
        warnings.warn(
            f"the latent dataset stores text embeddings of {stored['source']!r} (max_length "
            f"{stored['max_length']}), not of --text_encoder {model_args.text_encoder!r}: encoding the "
            "captions during training instead",
            stacklevel=2,
        )
    encoder = load_text_encoder(model_args.text_encoder, max_length=model_args.max_text_length)
    return TextConditioner(encoder, model_args.text_conditioning)


def build_network(
    objective: Objective, model_args, train_args, data: RunData, resolution: int, num_classes: int, text
):
    """(network, objective, number of classes it is conditioned on) for the data: the objective's --model preset,
    with the weights of --init_from when given; or the diffusers network --init_from names, as it is (see
    model_folder.load_pretrained_network, which may give the objective the network's noise schedule)."""
    source = model_args.init_from
    if source:
        pretrained = load_pretrained_network(objective, source, model_args.init_from_revision, train_args.hub_token)
        if pretrained is not None:
            model, objective, record = pretrained
            return model, objective, fit_pretrained(model, record, data, resolution, num_classes, model_args)
    text_config = text.model_config() if text else None
    channels, frames = data.train.num_channels, data.train.num_frames
    model = objective.build_model(model_args, channels, resolution, num_classes, text_config, frames)
    if source:
        load_pretrained_weights(model, source, model_args.init_from_revision, train_args.hub_token)
    return model, objective, num_classes


def fit_pretrained(model, record: dict, data: RunData, resolution: int, num_classes: int, model_args) -> int:
    """Check the data against a pretrained diffusers network (shape, classes, no text) and give a latent dataset
    the normalisation the network was trained with (its VAE's scaling, not the data's channel statistics). Returns
    the number of classes it is conditioned on: none for an unconditional network, whatever --class_conditional."""
    config, source = model.config, model_args.init_from
    if model_args.text_encoder:
        raise UserError(f"--text_encoder: --init_from '{source}' is a diffusers {config.network_class}, without text")
    have = (data.train.num_channels, resolution)
    if have != (config.in_channels, config.sample_size):
        what = "latents" if data.latent else "images (--num_channels, --resolution)"
        hint = "; it is a latent model: train on a --latent_dataset encoded by its VAE" if "latent" in record else ""
        raise UserError(
            f"--init_from '{source}' takes {config.in_channels}x{config.sample_size}x{config.sample_size} inputs, but "
            f"the data gives {have[0]}x{have[1]}x{have[1]} {what}{hint}"
        )
    if num_classes > config.num_classes > 0:
        raise UserError(f"the data has {num_classes} classes, more than the {config.num_classes} of '{source}'")
    if data.latent and "latent" in record:
        ours, theirs = data.latent["vae"], record["latent"]["vae"]
        for key in ("kind", "latent_channels", "downsample_factor", "scaling_factor", "shift_factor"):
            if ours.get(key) != theirs.get(key):
                raise UserError(
                    f"--init_from '{source}' was trained on latents of the VAE {theirs['source']} ({key} "
                    f"{theirs.get(key)}), but --latent_dataset was encoded by {ours['source']} ({key} "
                    f"{ours.get(key)}); encode the images with encode_latents.py --vae {theirs['source']}"
                )
        statistics = {k: record["latent"][k] for k in ("channel_mean", "channel_std")}
        data.latent.update(statistics)
        data.train.channel_mean, data.train.channel_std = (torch.tensor(v) for v in statistics.values())
    return num_classes if config.num_classes else 0


def make_accelerator(
    train_args: TrainingArguments, out: Path, trackers: list[str], objective: Objective
) -> Accelerator:
    """Accelerate for this launch, with DeepSpeed's batch and clipping filled in; FSDP1, and a launch the objective
    cannot train under, refused."""
    accelerator = Accelerator(
        # Launched as several processes without GPUs (e.g. `accelerate launch --multi_gpu` on CPUs): use gloo.
        cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ,
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED":
        configure_deepspeed(accelerator, train_args)
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise UserError("accelerate's FSDP: set fsdp_version: 2 in the accelerate config (FSDP1 is not supported)")
    objective.check_launch(weight_sharding(accelerator))
    return accelerator


def weight_sharding(accelerator) -> str | None:
    """How the launch splits the network's weights over the processes ("FSDP", "DeepSpeed ZeRO-3"), or None when
    every process holds them whole."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return "FSDP"
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def configure_deepspeed(accelerator, train_args: TrainingArguments):
    """Fill what DeepSpeed's config leaves to the script ("auto" or absent): the batch per GPU (the data loader is the
    script's own, not prepared by Accelerate) and the gradient clipping, from --max_grad_norm (0: none)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    batch = config.get("train_micro_batch_size_per_gpu", "auto")
    if batch not in ("auto", train_args.train_batch_size):
        raise UserError(
            f"the DeepSpeed config's train_micro_batch_size_per_gpu is {batch} but --train_batch_size is "
            f'{train_args.train_batch_size}: set it to "auto" (or to the same number)'
        )
    config["train_micro_batch_size_per_gpu"] = train_args.train_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train_args.max_grad_norm


def run_record(script, argv, data_args, model_args, train_args, objective) -> dict:
    """What run_config.json holds: the script, the command (token hidden) and every setting (secrets left out)."""
    return {
        "script": script,
        "command": command_line(Path(script).name, argv),
        "config": to_dict(data_args, model_args, train_args, objective.args),
    }


def start_run_dir(record: dict, train_args: TrainingArguments, accelerator) -> HubPusher | None:
    """On the main process: the run dir with run_config.json (`record`), and the background Hub uploader of
    --push_to_hub (None when a push cannot work, with a warning)."""
    if not accelerator.is_main_process:
        return None
    out = Path(train_args.output_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / RUN_CONFIG_FILE, json.dumps(record, indent=2))
    if not (train_args.push_to_hub or train_args.push_checkpoints_to_hub):
        return None
    problem = check_push(train_args.hub_model_id, train_args.hub_token, out)
    if problem:
        warn(
            f"{problem}: training goes on without pushing; push the finished run with "
            f"`{push_later(out, train_args.hub_model_id)}`"
        )
        return None
    return HubPusher(out, train_args.hub_model_id, train_args.hub_token, train_args.hub_private_repo)


def measure_flops(model, objective: Objective, data, conditions: ConditionSource, device) -> float:
    """Training FLOPs per image, counted once on two real images (their cost does not depend on the values)."""
    batch = {k: v.to(device) for k, v in WithIndex(data.dataset).__getitems__([0, 1 % len(data.dataset)]).items()}
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = model_input(batch, data, generator, False)
    cond = conditions.batch(batch, generator, device)
    return model_flops_per_image(model, objective, x0, cond, generator)


def make_optimizer(model, train: TrainingArguments):
    """AdamW (fused on GPUs), or bitsandbytes' 8-bit AdamW with --use_8bit_adam."""
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if train.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(model.parameters(), **kwargs)
    fused = torch.cuda.is_available() and next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), fused=fused or None, **kwargs)


def prepare_training(run: Run):
    """Optimizer, LR schedule and EMA for `run.model`, prepared by Accelerate (wrapped for DDP, sharded under FSDP
    and DeepSpeed), then the memory format and compilation of the model itself."""
    train_args, accelerator, model = run.train_args, run.accelerator, run.model
    fsdp = accelerator.distributed_type.name == "FSDP"
    run.deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    optimizer = make_optimizer(model, train_args)
    run.lr_scheduler = get_scheduler(
        train_args.lr_scheduler,
        optimizer,
        num_warmup_steps=train_args.lr_warmup_steps,
        num_training_steps=train_args.max_train_steps,
    )
    # Under FSDP only the main process keeps a full EMA copy (to sample and save); each process averages its shard.
    keep_copy = accelerator.is_main_process or not fsdp
    run.ema = EMA(model, train_args.ema_max_decay, train_args.ema_power, keep_copy=keep_copy)
    if train_args.ema_phema_stds:
        stds = parse_stds(train_args.ema_phema_stds, "--ema_phema_stds")
        run.profiles = [EMA(model, keep_copy=keep_copy, std=std) for std in stds]
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    run.unwrapped = unwrapped = accelerator.unwrap_model(run.model)
    if run.deepspeed and (dtype := next(unwrapped.parameters()).dtype) != torch.float32:
        # DeepSpeed's bf16 (and fp16) hold the weights in that type and leave the inputs to the script: autocast
        # feeds the model its weights' type and keeps norms and the loss in float32, as Accelerate does elsewhere.
        run.compute = functools.partial(torch.autocast, accelerator.device.type, dtype=dtype)
    if fsdp:
        for ema in (run.ema, *run.profiles):
            ema.shard_like(unwrapped)
    if train_args.channels_last:
        unwrapped.to(memory_format=torch.channels_last)
    if train_args.torch_compile:
        # In place: the module's forward is compiled, its parameters and state_dict keys stay as they are, so
        # checkpoints, the EMA and resume do not see it. The first steps pay the compilation.
        unwrapped.compile(backend=train_args.torch_compile_backend)


def find_resume(train_args: TrainingArguments, out: Path, accelerator, model) -> Path | None:
    """The checkpoint --resume_from_checkpoint names, if any: local, or a hub: / wandb: one that the main process
    downloads (modules/training/remote.py); refused when it was made for another model."""
    reference = parse_reference(train_args.resume_from_checkpoint)
    if reference is None:
        path = resolve_resume(train_args.resume_from_checkpoint, out)
    else:
        if reference.kind == "wandb" and train_args.report_to not in ("wandb", "all"):
            warn(f"--resume_from_checkpoint {reference} without --report_to wandb: the wandb run is not continued")
        path = fetch(reference, out, train_args.hub_token) if accelerator.is_main_process else None
        path = broadcast_object_list([path])[0]  # the others wait for the download
    if path is not None:
        check_compatible(path, model)
    return path


def resume_from(run: Run, checkpoint: Path):
    """Model, optimizer, RNG states and EMA from `checkpoint`, and where the run was (see checkpoint.py)."""
    state = load_checkpoint(run.accelerator, checkpoint, run.ema, run.profiles)
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.start_step, run.images_seen = state["step"], state["images_seen"]
    run.seconds_before = state.get("train_seconds", 0.0)
    run.resumed_wandb_run = state.get("wandb_run")
    run.accelerator.print(f"resumed from {checkpoint} at step {run.start_step}")


def start_logging(run: Run, record: dict, trackers: list[str], cleanup: contextlib.ExitStack):
    """The trackers, metrics.jsonl, the run's summary line, the progress bar and the clock of the first window."""
    accelerator, train_args, data = run.accelerator, run.train_args, run.data.train
    if trackers:
        start_trackers(run, record, trackers, cleanup)
    run.metrics = MetricsLog(accelerator, run.out / "metrics.jsonl")
    n_params = sum(p.numel() for p in run.unwrapped.parameters())
    name = run.model_args.model
    if isinstance(run.unwrapped, DiffusersDenoiser):
        conditioned = "class-conditional" if run.conditions.num_classes else "unconditional"
        name = f"diffusers {run.unwrapped.config.network_class} from {run.model_args.init_from} ({conditioned})"
    until = f"{train_args.max_train_steps}"
    if train_args.max_train_minutes:
        until += f" or {train_args.max_train_minutes:g} minutes, whichever ends first"
    what = f"clips of {data.num_frames} frames" if data.num_frames else "images"
    accelerator.print(
        f"{name}: {n_params / 1e6:.2f}M parameters | {len(data.dataset)} {what} ({data.key}) | "
        f"{run.condition} | {accelerator.num_processes} process(es), global batch {run.images_per_step} | steps "
        f"{run.start_step} -> {until}"
    )
    if run.text is not None and run.text.encoder is None:
        accelerator.print(
            f"text: the embeddings of {len(run.text.stored)} distinct captions stored with the latents "
            f"({run.text.record['source']}); the text encoder is not loaded"
        )
    run.started = time.perf_counter()
    run.progress = tqdm(
        total=train_args.max_train_steps,
        initial=run.start_step,
        disable=not accelerator.is_main_process,
        desc="training",
        dynamic_ncols=True,
    )
    cleanup.callback(run.progress.close)
    run.window = LogWindow(torch.zeros((), device=accelerator.device))
    run.guard = NonFiniteGuard(train_args.max_nonfinite_steps)
    run.model.train()


def start_trackers(run: Run, record: dict, trackers: list[str], cleanup: contextlib.ExitStack):
    """Accelerate's trackers, in the experiment (project) named after the script. MLflow's parameters are the whole
    run record (run_config.json, flattened); the others get the data, model and objective settings."""
    accelerator = run.accelerator
    if "mlflow" in trackers:
        accelerator.print(f"mlflow: logging to {hide_password(mlflow_store(run.out))}")
        cleanup.push(end_mlflow_run_on_error)
    accelerator.init_trackers(
        Path(record["script"]).stem, init_kwargs=tracker_settings(trackers, run.out, run.resumed_wandb_run)
    )
    config = to_dict(run.data_args, run.model_args, run.objective.args)
    for tracker in accelerator.trackers:
        params = mlflow_params(record, run.train_args.hub_token) if tracker.name == "mlflow" else config
        tracker.store_init_configuration(params)
