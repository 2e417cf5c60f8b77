"""The training loop, shared by every training script: the script supplies an objective, this does the rest.

An objective has `loss(model, x0, cond, generator) -> per-sample loss` and `sample(model, noise, cond, ...)`.
Randomness in the loop comes from generators seeded by (seed, rank, step, micro-batch), and the data order from
(seed, epoch, rank), so resuming from a checkpoint continues exactly where the run was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from modules.artifacts.hub import HubPusher, check_push, push_later
from modules.artifacts.model_folder import load_pretrained_weights, save_model
from modules.artifacts.visualize import DenoisingRecorder, save_image_grid, write_denoising_figures
from modules.config import DataArguments, ModelArguments, TrainingArguments, UserError, warn
from modules.data.batches import WithIndex, model_input
from modules.data.conditions import Conditioning
from modules.data.images import collate_examples
from modules.data.latents import latent_decoder
from modules.data.order import ResumableBatchSampler, step_generator
from modules.evaluation.metrics import evaluate_generated, parse_eval_metrics
from modules.files import write_text_atomically
from modules.networks.presets import build_model
from modules.networks.text import TextConditioner, load_text_encoder, stored_text_matches
from modules.records import command_line, to_dict
from modules.training.checkpoint import (
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from modules.training.ema import EMA
from modules.training.flops import model_flops_per_image, peak_tflops
from modules.training.setup import open_data, validate
from modules.training.sizing import dry_run
from modules.training.stopping import NonFiniteGuard, StopRequest, agree


def wandb_login_state() -> str:
    """'offline' when WANDB_MODE says so, 'key' when an API key is at hand (env or `wandb login`'s netrc entry),
    else 'none'. Only files and the environment are read: no network."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "key"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "key" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "none"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "none"


def resolve_trackers(report_to: str, out: Path) -> list[str]:
    """The Accelerate trackers for --report_to, warning (and carrying on) when one cannot work as asked:
    wandb not installed is dropped; wandb without a login logs offline into the run dir, to `wandb sync` later."""
    import importlib.util

    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    trackers = []
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            warnings.warn(
                f"--report_to {report_to}: {name} is not installed (pip install {name}); "
                "not logging to it (metrics.jsonl is still written)",
                stacklevel=2,
            )
            continue
        if name == "wandb" and wandb_login_state() == "none":
            warnings.warn(
                "--report_to wandb: not logged in (no WANDB_API_KEY, no `wandb login`); logging offline to "
                f"{out / 'wandb'}; upload later with `wandb sync {out / 'wandb'}/offline-run-*`",
                stacklevel=2,
            )
            os.environ["WANDB_MODE"] = "offline"
        trackers.append(name)
    return trackers


def make_optimizer(model, train: TrainingArguments):
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


class MetricsLog:
    """metrics.jsonl in the run dir (always), plus the Accelerate trackers when --report_to asks for them."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, path

    def log(self, step: int, values: dict):
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)


def measure_flops(model, objective, data, conditioning: Conditioning, device) -> float:
    """Training FLOPs per image, counted once on two real images (their cost does not depend on the values)."""
    batch = {k: v.to(device) for k, v in WithIndex(data.dataset).__getitems__([0, 1 % len(data.dataset)]).items()}
    generator = torch.Generator(device=device).manual_seed(0)
    x0 = model_input(batch, data, generator, False)
    cond = conditioning.batch(batch, generator, device)
    return model_flops_per_image(model, objective, x0, cond, generator)


def sample_grid(
    ema_model, objective, data, conditioning, train: TrainingArguments, shape, device, path: Path, decode=None
):
    """A grid from the EMA model with fixed noise (seed `train.seed`), a column per class when conditional, and
    the denoising path of its first images next to it (<name>_denoising.png, _trajectories.png, _denoising.gif)."""
    n = train.num_sample_images
    if not n:
        return
    cond, _ = conditioning.for_images(n)
    recorder = DenoisingRecorder(max_samples=min(n, data.num_classes or 8))
    images = objective.preview(
        ema_model,
        n,
        train.seed,
        shape,
        cond,
        device,
        data,
        decode,
        callback=recorder,
        null_cond=conditioning.null(device),
    )
    images, nrow = objective.grid_layout(images, data)
    save_image_grid(images, path, nrow=nrow)
    if recorder.num_steps:  # objectives that sample record their path; an autoencoder has none
        write_denoising_figures(recorder.decode(decode) if decode else recorder, path.parent, path.stem)


def train(
    script: str,
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: TrainingArguments,
    objective,
    argv=None,
):
    """Train `objective` on the data and model the arguments name; writes everything under train_args.output_dir.
    SIGTERM / SIGUSR1 and --max_train_minutes end it early with a checkpoint (modules/stopping.py)."""
    with StopRequest(train_args.max_train_minutes) as stop_request, contextlib.ExitStack() as cleanup:
        return _train(script, data_args, model_args, train_args, objective, argv, stop_request, cleanup)


def _train(script, data_args, model_args, train_args, objective, argv, stop_request: StopRequest, cleanup):
    """`cleanup` (an ExitStack) closes the progress bar before an error is printed, so it starts a line."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    # Everything that can fail on bad input happens before the run directory is touched.
    validate(train_args, objective.args)
    if train_args.dry_run:
        return dry_run(data_args, model_args, train_args, objective)
    out = Path(train_args.output_dir)
    data, held_out, reference, latent = open_data(data_args, model_args, train_args)
    resolution = data.resolution if latent else data_args.resolution
    n_ref = train_args.fid_reference_samples or train_args.fid_num_samples
    if reference is not None and n_ref > len(reference.dataset):
        raise UserError(
            f"--fid_reference_samples {n_ref} is more than the {len(reference.dataset)} training images; lower it "
            "(or --fid_num_samples, which it defaults to)"
        )
    if train_args.fid_num_samples == 1:
        raise UserError("--fid_num_samples 1: a covariance needs at least 2 images")
    if "classifier" in train_args.eval_metrics and not (reference or data).key.startswith("fashion_mnist"):
        raise UserError("--eval_metrics classifier is trained on Fashion-MNIST and only measures Fashion-MNIST runs")
    num_classes = data.num_classes if model_args.class_conditional else 0
    text = None
    if model_args.text_encoder:
        if model_args.max_text_length is not None and model_args.max_text_length < 2:
            raise UserError(f"--max_text_length must be at least 2, got {model_args.max_text_length}")
        stored = getattr(data, "text_encoder", None)
        if stored and stored_text_matches(stored, model_args.text_encoder, model_args.max_text_length):
            text = TextConditioner.from_stored(stored, data.text_embeddings(), model_args.text_conditioning)
        else:
            if stored:
                warnings.warn(
                    f"the latent dataset stores text embeddings of {stored['source']!r} (max_length "
                    f"{stored['max_length']}), not of --text_encoder {model_args.text_encoder!r}: encoding the "
                    "captions during training instead",
                    stacklevel=2,
                )
            encoder = load_text_encoder(model_args.text_encoder, max_length=model_args.max_text_length)
            text = TextConditioner(encoder, model_args.text_conditioning)
    torch.manual_seed(train_args.seed)  # same initial weights on every process
    make_model = getattr(objective, "build_model", build_model)
    model = make_model(model_args, data.num_channels, resolution, num_classes, text.model_config() if text else None)
    if model_args.init_from:
        load_pretrained_weights(model, model_args.init_from, model_args.init_from_revision, train_args.hub_token)
    resume = resolve_resume(train_args.resume_from_checkpoint, out)
    if resume is not None:
        check_compatible(resume, dict(model.config))

    trackers = resolve_trackers(train_args.report_to, out)
    accelerator = Accelerator(
        # Launched as several processes without GPUs (e.g. `accelerate launch --multi_gpu` on CPUs): use gloo.
        cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ,
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    fsdp, deepspeed = (accelerator.distributed_type.name == kind for kind in ("FSDP", "DEEPSPEED"))
    if deepspeed:
        configure_deepspeed(accelerator, train_args)
    if fsdp and not accelerator.is_fsdp2:
        raise UserError("accelerate's FSDP: set fsdp_version: 2 in the accelerate config (FSDP1 is not supported)")
    decode = None
    if latent is not None and accelerator.is_main_process:  # before the run dir: a VAE that does not fit stops here
        decode = latent_decoder(latent, device)
    if train_args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sampler = ResumableBatchSampler(len(data.dataset), train_args.train_batch_size, train_args.seed, rank, world)

    pusher = None
    if accelerator.is_main_process:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        record = {
            "script": script,
            "command": command_line(Path(script).name, argv),
            "config": to_dict(data_args, model_args, train_args, objective.args),
        }
        write_text_atomically(out / "run_config.json", json.dumps(record, indent=2))
        if train_args.push_to_hub:
            pusher = start_pusher(train_args, out)
    if train_args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    conditioning = Conditioning(data, num_classes, text.to(device) if text else None, train_args.cond_drop_prob)
    flops_per_image = measure_flops(model.to(device), objective, data, conditioning, device)
    peak = train_args.peak_tflops or peak_tflops(device, accelerator.mixed_precision)
    optimizer = make_optimizer(model, train_args)
    lr_scheduler = get_scheduler(
        train_args.lr_scheduler,
        optimizer,
        num_warmup_steps=train_args.lr_warmup_steps,
        num_training_steps=train_args.max_train_steps,
    )
    # Under FSDP only the main process keeps a full EMA copy (to sample and save); each process averages its shard.
    ema = EMA(model, train_args.ema_max_decay, train_args.ema_power, keep_copy=accelerator.is_main_process or not fsdp)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    compute = contextlib.nullcontext
    if deepspeed and (dtype := next(unwrapped.parameters()).dtype) != torch.float32:
        # DeepSpeed's bf16 (and fp16) hold the weights in that type and leave the inputs to the script: autocast
        # feeds the model its weights' type and keeps norms and the loss in float32, as Accelerate does elsewhere.
        compute = functools.partial(torch.autocast, device.type, dtype=dtype)
    if fsdp:
        ema.shard_like(unwrapped)
    if train_args.channels_last:
        unwrapped.to(memory_format=torch.channels_last)
    if train_args.torch_compile:
        # In place: the module's forward is compiled, its parameters and state_dict keys stay as they are, so
        # checkpoints, the EMA and resume do not see it. The first steps pay the compilation.
        unwrapped.compile(backend=train_args.torch_compile_backend)

    start_step, images_seen, seconds_before = 0, 0, 0.0
    if resume is not None:
        state = load_checkpoint(accelerator, resume, ema)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start_step, images_seen = state["step"], state["images_seen"]
        seconds_before = state.get("train_seconds", 0.0)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    sampler.start_batch = start_step * train_args.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(
        WithIndex(data.dataset) if text else data.dataset,
        batch_sampler=sampler,
        collate_fn=collate_examples,
        num_workers=data_args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=data_args.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(train_args.seed),  # keeps the global RNG (dropout) untouched
    )
    batches = iter(loader)

    if trackers:
        accelerator.init_trackers(
            Path(script).stem,
            config=to_dict(data_args, model_args, objective.args),
            init_kwargs={"wandb": {"dir": str(out)}} if "wandb" in trackers else {},
        )
    metrics = MetricsLog(accelerator, out / "metrics.jsonl")
    n_params = sum(p.numel() for p in unwrapped.parameters())
    global_batch = train_args.train_batch_size * world * train_args.gradient_accumulation_steps
    accelerator.print(
        f"{model_args.model}: {n_params / 1e6:.2f}M parameters | {len(data.dataset)} images ({data.key}) | "
        f"{world} process(es), global batch {global_batch} | steps {start_step} -> {train_args.max_train_steps}"
    )
    if text is not None and text.encoder is None:
        accelerator.print(
            f"text: the embeddings of {len(text.stored)} distinct captions stored with the latents "
            f"({text.record['source']}); the text encoder is not loaded"
        )

    clock = time.perf_counter()

    def train_seconds():  # over every resumed part of the run
        return seconds_before + time.perf_counter() - clock

    def model_record(step):
        """What objective.json holds next to the EMA weights, besides the objective's settings."""
        return {
            "dataset_key": data.key,
            "class_names": data.class_names,
            **({"latent": latent} if latent else {}),
            **({"text_encoder": text.record, "sample_prompts": list(data.captions[:16])} if text else {}),
            "steps": step,
            "images_seen": images_seen,
            "train_hours": round(train_seconds() / 3600, 4),
        }

    def push(step, final=False):
        if pusher is not None:
            if train_args.num_sample_images and not (out / "samples" / f"step_{step:07d}.png").is_file():
                write_grid(step)  # each push shows what its weights generate
            extra = model_record(step)
            pusher.push(step, lambda folder: save_model(ema.model, objective, folder, extra), final)

    def checkpoint(step, push_it=True):
        state = {
            "images_seen": images_seen,
            "lr_scheduler": lr_scheduler.state_dict(),
            "model_config": dict(unwrapped.config),
            "train_seconds": train_seconds(),
        }
        save_checkpoint(accelerator, out, step, ema, state, train_args.checkpoints_total_limit)
        if push_it and step < train_args.max_train_steps:  # the last one is pushed after the final grid and FID
            push(step)

    shape = (data.num_channels, resolution, resolution)
    validation_set = functools.cache(lambda: conditioning.held_out(held_out))

    def write_grid(step):
        path = out / "samples" / f"step_{step:07d}.png"
        sample_grid(ema.model, objective, data, conditioning, train_args, shape, device, path, decode)

    def evaluate(step):
        ema.gather()
        evaluate_fid(
            accelerator, ema.model, objective, data, conditioning, reference, train_args, shape, metrics, step, decode
        )

    progress = tqdm(
        total=train_args.max_train_steps,
        initial=start_step,
        disable=not accelerator.is_main_process,
        desc="training",
        dynamic_ncols=True,
    )
    cleanup.callback(progress.close)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    window_good, grad_norm = 0, None  # steps of the window that updated the model, the last gradient norm
    stop_reason = None
    guard = NonFiniteGuard(train_args.max_nonfinite_steps)
    model.train()
    for step in range(start_step, train_args.max_train_steps):
        step_loss, nonfinite, skipped = torch.zeros((), device=device), False, False
        for micro in range(train_args.gradient_accumulation_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            generator = step_generator(train_args.seed, rank, step, micro, device)
            x0 = model_input(batch, data, generator, data_args.random_flip)
            cond = conditioning.batch(batch, generator, device)
            with accelerator.accumulate(model):
                with compute():
                    loss = objective.loss(model, x0, cond, generator).mean()
                accelerator.backward(loss)
                step_loss += loss.detach() / train_args.gradient_accumulation_steps
                if accelerator.sync_gradients:
                    # The gradient norm (clipped when --max_grad_norm > 0) is what the guard checks with the loss.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm or math.inf)
                    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                        grad_norm = grad_norm.full_tensor()
                    checked = step_loss if grad_norm is None else step_loss + grad_norm  # None: DeepSpeed did not say
                    nonfinite, stop = agree(
                        accelerator, not bool(torch.isfinite(checked)), stop_request.reason() is not None
                    )
                    if stop and stop_reason is None:
                        stop_reason = stop_request.reason() or "a stop request on another process"
                    if accelerator.scaler is not None or deepspeed:
                        # fp16's gradient scaler skips overflowing steps itself; DeepSpeed has stepped in backward,
                        # skipping a step whose gradients are not finite, and its optimizer.step() does nothing.
                        optimizer.step()
                        skipped = optimizer.step_was_skipped
                    elif nonfinite:
                        skipped = True
                    else:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        images_seen += global_batch
        done = step + 1
        progress.update(1)
        guard.update(skipped, done, lambda: (list_checkpoints(out) or [None])[-1])
        if not skipped:
            lr_scheduler.step()
            ema.update(unwrapped)
            window_loss += step_loss
            window_good += 1
        window_steps += 1

        if done % train_args.logging_steps == 0 or done == train_args.max_train_steps:
            mean_loss = accelerator.reduce(window_loss, "mean").item() / max(window_good, 1)
            elapsed = time.perf_counter() - window_start
            values = {
                "loss": mean_loss if window_good else math.nan,
                "lr": lr_scheduler.get_last_lr()[0],
                "images_seen": images_seen,
                "img_per_s": window_steps * global_batch / elapsed,
            }
            if train_args.max_grad_norm > 0 and grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            if guard.total:
                values["nonfinite_steps"] = guard.total
            values["tflops"] = flops_per_image * values["img_per_s"] / 1e12
            if peak:
                values["mfu"] = values["tflops"] / (peak * world)
            values.update(peak_memory(device))
            metrics.log(done, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
            window_loss.zero_()
            window_steps, window_good, window_start = 0, 0, time.perf_counter()
        if train_args.checkpointing_steps and done % train_args.checkpointing_steps == 0:
            checkpoint(done)
        last = done == train_args.max_train_steps
        if held_out is not None and (done % train_args.validation_steps == 0 or last):
            ema.gather()
            if accelerator.is_main_process:
                images, labels = validation_set()
                values = objective.validation(ema.model, images, labels, train_args.seed, train_args.validation_t_bins)
                metrics.log(done, values)
            accelerator.wait_for_everyone()
        if train_args.eval_fid_steps and done % train_args.eval_fid_steps == 0 and not last:
            evaluate(done)
            accelerator.wait_for_everyone()
        if train_args.sample_steps and done % train_args.sample_steps == 0 and done != train_args.max_train_steps:
            ema.gather()
            if accelerator.is_main_process:
                write_grid(done)
            accelerator.wait_for_everyone()
        if stop_reason and not last:
            progress.close()
            if not (train_args.checkpointing_steps and done % train_args.checkpointing_steps == 0):
                checkpoint(done, push_it=False)  # no upload: a preempted job has seconds, not minutes
            accelerator.print(
                f"stopped at step {done} of {train_args.max_train_steps} ({stop_reason}): checkpoint saved in "
                f"{out / 'checkpoints'}; rerun the same command with --resume_from_checkpoint latest to continue"
            )
            if pusher is not None:
                pusher.finish()
            accelerator.end_training()
            return out
    progress.close()

    final = train_args.max_train_steps
    if not (train_args.checkpointing_steps and final % train_args.checkpointing_steps == 0) and start_step < final:
        checkpoint(final)
    ema.gather()
    if accelerator.is_main_process:
        save_model(ema.model, objective, out, extra=model_record(final))
        write_grid(final)
        accelerator.print(f"saved the EMA model and samples to {out}")
        if text is not None and text.truncated:
            limit = text.record["max_length"]
            warnings.warn(
                f"{text.truncated} caption(s) were longer than the text encoder's {limit} tokens and were "
                "truncated (--max_text_length)",
                stacklevel=2,
            )
    accelerator.wait_for_everyone()
    if train_args.fid_num_samples:
        evaluate(final)
    if pusher is not None:
        push(final, final=True)  # with the grid and FID of the end
        pusher.finish()
    accelerator.end_training()
    return out


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


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident memory (GiB; what the OS had to give it) and, on a GPU, torch's peak allocation."""
    import resource

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def start_pusher(train_args: TrainingArguments, out: Path):
    """The background uploader of --push_to_hub, or None with a warning when a push cannot work."""

    problem = check_push(train_args.hub_model_id, train_args.hub_token, out)
    if problem:
        warn(
            f"{problem}: training goes on without pushing; push the finished run with "
            f"`{push_later(out, train_args.hub_model_id)}`"
        )
        return None
    return HubPusher(out, train_args.hub_model_id, train_args.hub_token, train_args.hub_private_repo)


def evaluate_fid(
    accelerator, ema_model, objective, data, conditioning, reference, train_args, shape, metrics, step, decode=None
):
    """--eval_metrics of the EMA model's images (uint8, decoded when latent) against the reference images: Inception
    FID/KID with reference statistics cached on disk, and the Fashion-MNIST classifier's metrics. Main process only;
    writes fid.json."""
    if not accelerator.is_main_process:
        return

    n = train_args.fid_num_samples
    cond, labels = conditioning.for_images(n)
    images = objective.preview(
        ema_model,
        n,
        train_args.seed + 1,
        shape,
        cond,
        accelerator.device,
        data,
        decode,
        progress=True,
        null_cond=conditioning.null(accelerator.device),
    )
    n_ref = train_args.fid_reference_samples or n
    values = evaluate_generated(
        images,
        labels,
        reference,
        n_ref,
        parse_eval_metrics(train_args.eval_metrics),
        weights_path=train_args.fid_weights,
    )
    metrics.log(step, {**values, "fid_num_samples": n, "fid_reference_samples": n_ref})
    result = {"step": step, **values, "num_samples": n, "reference_samples": n_ref, "reference": reference.key}
    Path(train_args.output_dir, "fid.json").write_text(json.dumps(result, indent=2))
    accelerator.print(", ".join(f"{k} {v:.4g}" for k, v in values.items()) + f" ({n} samples vs {n_ref} images)")
