"""What happens between two optimizer steps, and after the last: update the EMA and the counters, then the
duties that come at their own intervals (log, checkpoint, validate, evaluate, write a grid, push to the Hub), a
stop when one is asked for, and the end of the run.

Every duty that looks at the model looks at its EMA (`EMA.gather` assembles it first under FSDP), and every
process calls every duty: those that write do it on the main process while the others wait.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from modules.artifacts.clips import save_samples
from modules.artifacts.model_folder import save_model
from modules.artifacts.phema import SNAPSHOT_DIR, snapshot_name
from modules.artifacts.visualize import DenoisingRecorder, write_denoising_figures
from modules.evaluation.metrics import evaluate_generated, parse_eval_metrics
from modules.files import write_atomically, write_text_atomically
from modules.objectives.protocol import PreviewRequest
from modules.training.alignment import PROJECTOR
from modules.training.checkpoint import list_checkpoints, save_checkpoint
from modules.training.remote import share_checkpoint
from modules.training.run import Run
from modules.training.step import StepResult
from modules.training.stopping import Outlook, outlook
from modules.training.tracking import peak_memory, wandb_record


def update_after_step(run: Run, result: StepResult, done: int):
    """Count the step, let the non-finite guard see it (it raises after too many in a row), and unless it was
    skipped, advance the learning rate schedule and the EMA."""
    run.images_seen += run.images_per_step
    show_progress(run, run_outlook(run, done))
    if result.stop and run.stop_reason is None:
        run.stop_reason = run.stop_request.reason() or "a stop request on another process"
    run.grad_norm = result.grad_norm
    run.guard.update(result.skipped, done, lambda: (list_checkpoints(run.out) or [None])[-1])
    if not result.skipped:
        run.lr_scheduler.step()
        run.ema.update(run.unwrapped)
        for profile in run.profiles:
            profile.update(run.unwrapped)
    run.window.add(result.loss, result.skipped)


def run_outlook(run: Run, done: int) -> Outlook:
    """Where and when this run will end, at the speed of this launch so far (modules/training/stopping.py)."""
    elapsed = time.perf_counter() - run.started
    seconds_left = run.stop_request.seconds_left()
    return outlook(done, done - run.start_step, elapsed, run.train_args.max_train_steps, seconds_left)


def show_progress(run: Run, ahead: Outlook):
    """Advance the bar by one step. It counts to the step the run is projected to end at: --max_train_steps, or when
    --max_train_minutes binds first, the steps that the time left allows at the speed so far; so its ETA is the end
    of the run, and its description names the limit."""
    bar = run.progress
    if bar.disable:  # not the main process: nothing to show
        return
    bar.total = ahead.end_step
    desc = f"training ({run.train_args.max_train_minutes:g} min limit)" if ahead.by_time else "training"
    if bar.desc != desc:
        bar.set_description_str(desc, refresh=False)
    bar.update(1)


def log_if_due(run: Run, done: int):
    """Every --logging_steps and at the end: the window's loss, learning rate, throughput, FLOPs and memory, and the
    step the run will end at and the minutes until then, by whichever limit binds first."""
    train_args = run.train_args
    if done % train_args.logging_steps and not run.last_step(done):
        return
    window = run.window.values(run.accelerator, run.images_per_step)
    values = {
        "loss": window["loss"],
        "lr": run.lr_scheduler.get_last_lr()[0],
        "images_seen": run.images_seen,
        "img_per_s": window["img_per_s"],
    }
    if train_args.max_grad_norm > 0 and run.grad_norm is not None:
        values["grad_norm"] = float(run.grad_norm)
    if run.guard.total:
        values["nonfinite_steps"] = run.guard.total
    values["tflops"] = run.flops_per_image * values["img_per_s"] / 1e12
    if run.peak_tflops:
        values["mfu"] = values["tflops"] / (run.peak_tflops * run.accelerator.num_processes)
    values.update(peak_memory(run.accelerator.device))
    values.update(run.alignment.log_values())
    ahead = run_outlook(run, done)
    values.update(end_step=ahead.end_step, eta_min=ahead.eta_s / 60)
    run.metrics.log(done, values)
    run.progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
    run.window.reset()


def checkpoint_due(run: Run, done: int) -> bool:
    return bool(run.train_args.checkpointing_steps) and done % run.train_args.checkpointing_steps == 0


def checkpoint_if_due(run: Run, done: int):
    """Every --checkpointing_steps: a checkpoint, pushed to the Hub unless it is the last (pushed at the end)."""
    if checkpoint_due(run, done):
        checkpoint(run, done)


def snapshot_if_due(run: Run, done: int):
    """Every --ema_snapshot_steps: each post-hoc EMA profile to <output_dir>/phema/ (modules/artifacts/phema.py),
    as safetensors written whole."""
    every = run.train_args.ema_snapshot_steps
    if not run.profiles or done % every:
        return
    from safetensors.torch import save

    for profile in run.profiles:
        profile.gather()
        if run.accelerator.is_main_process:
            path = run.out / SNAPSHOT_DIR / snapshot_name(done, profile.std)
            metadata = {"step": str(done), "std": str(profile.std), "exponent": str(profile.exponent)}
            state = {k: v for k, v in profile.state_dict().items() if not k.startswith(PROJECTOR + ".")}
            weights = save(state, metadata=metadata)
            write_atomically(path, lambda f, weights=weights: f.write(weights))
    run.accelerator.wait_for_everyone()


def validate_if_due(run: Run, done: int):
    """Every --validation_steps and at the end: the EMA model's metrics of the held-out data (validation loss)."""
    every = run.train_args.validation_steps
    if run.data.held_out is None or not every or (done % every and not run.last_step(done)):
        return
    run.ema.gather()
    if run.accelerator.is_main_process:
        if run.validation_set is None:  # decoded once for every validation of the run
            run.validation_set = run.conditions.held_out(run.data.held_out)
        x0, cond, noise = run.validation_set
        paired = {"noise": noise} if noise is not None else {}  # held-out pairs' noise (reflow)
        seed, bins = run.train_args.seed, run.train_args.validation_t_bins
        values = run.objective.validation(run.ema.model, x0, cond, seed, bins, **paired)
        run.metrics.log(done, values)
    run.accelerator.wait_for_everyone()


def evaluate_if_due(run: Run, done: int):
    """Every --eval_fid_steps before the end (the end has its own): --eval_metrics of the EMA model's samples."""
    steps = run.train_args.eval_fid_steps
    if steps and done % steps == 0 and not run.last_step(done):
        evaluate(run, done)
        run.accelerator.wait_for_everyone()


def grid_if_due(run: Run, done: int):
    """Every --sample_steps before the end (the end has its own): a sample grid of the EMA model."""
    steps = run.train_args.sample_steps
    if steps and done % steps == 0 and not run.last_step(done):
        run.ema.gather()
        if run.accelerator.is_main_process:
            write_grid(run, done)
        run.accelerator.wait_for_everyone()


def stop_early(run: Run, done: int):
    """A stop was asked for (signal, time limit): a checkpoint now (unless this step has one), then exit 0."""
    run.progress.close()
    if not checkpoint_due(run, done):
        checkpoint(run, done, upload=False)  # no model push: a preempted job has seconds, not minutes
    run.accelerator.print(
        f"stopped at step {done} of {run.train_args.max_train_steps} ({run.stop_reason}): checkpoint saved in "
        f"{run.out / 'checkpoints'}; rerun the same command with --resume_from_checkpoint latest to continue"
    )
    if run.pusher is not None:
        run.pusher.finish()
    run.accelerator.end_training()
    return run.out


def finish(run: Run):
    """The end: the last checkpoint, the EMA model saved with its record, the last grid, the final metrics and the
    final push."""
    run.progress.close()
    final = run.train_args.max_train_steps
    if not checkpoint_due(run, final) and run.start_step < final:
        checkpoint(run, final)
    run.ema.gather()
    accelerator, text = run.accelerator, run.text
    if accelerator.is_main_process:
        save_model(run.ema.model, run.objective, run.out, extra=model_record(run, final))
        write_grid(run, final)
        accelerator.print(f"saved the EMA model and samples to {run.out}")
        if text is not None and text.truncated:
            warnings.warn(
                f"{text.truncated} caption(s) were longer than the text encoder's {text.record['max_length']} tokens "
                "and were truncated (--max_text_length)",
                stacklevel=2,
            )
    accelerator.wait_for_everyone()
    if run.train_args.fid_num_samples:
        evaluate(run, final)
    if run.pusher is not None:
        push(run, final, final=True)  # with the grid and FID of the end
        run.pusher.finish()
    accelerator.end_training()
    return run.out


def checkpoint(run: Run, step: int, upload: bool = True):
    """A checkpoint of everything resume needs (modules/training/checkpoint.py) and the wandb run to continue, sent
    to the Hub and wandb (modules/training/remote.py), then the push of the model (`upload`)."""
    state = {
        "images_seen": run.images_seen,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "model_config": dict(run.unwrapped.config),
        "train_seconds": run.train_seconds(),
    }
    if (wandb := wandb_record(run.accelerator)) is not None:
        state["wandb_run"] = wandb
    limit = run.train_args.checkpoints_total_limit
    path = save_checkpoint(run.accelerator, run.out, step, run.ema, state, limit, run.profiles)
    if run.accelerator.is_main_process:
        share_checkpoint(run, path, step)
    if upload and step < run.train_args.max_train_steps:  # the last one is pushed after the final grid and FID
        push(run, step)


def push(run: Run, step: int, final: bool = False):
    """The EMA model, its record and its grid to the Hub, in the background (main process)."""
    if run.pusher is None or not run.train_args.push_to_hub:
        return
    if run.train_args.num_sample_images and not grid_path(run, step).is_file():
        write_grid(run, step)  # each push shows what its weights generate
    extra = model_record(run, step)
    run.pusher.push(step, lambda folder: save_model(run.ema.model, run.objective, folder, extra), final)


def model_record(run: Run, step: int) -> dict:
    """What objective.json holds next to the EMA weights, besides the objective's settings."""
    data, text = run.data.train, run.text
    return {
        "dataset_key": data.key,
        "class_names": data.class_names,
        **({"num_frames": data.num_frames} if data.num_frames else {}),
        **({"latent": run.data.latent} if run.data.latent else {}),
        **({"reflow": run.data.reflow} if run.data.reflow else {}),
        **({"text_encoder": text.record, "sample_prompts": list(data.captions[:16])} if text else {}),
        "steps": step,
        "images_seen": run.images_seen,
        "train_hours": round(run.train_seconds() / 3600, 4),
    }


def grid_path(run: Run, step: int) -> Path:
    return run.out / "samples" / f"step_{step:07d}.png"


def preview(run: Run, num_images: int, seed: int, **settings) -> tuple[torch.Tensor, list[int] | None]:
    """What the EMA model shows for `num_images` conditions of the run (uint8, decoded when latent), and the classes
    they should show (or None). `settings`: more fields of the PreviewRequest (callback, progress)."""
    cond, labels = run.conditions.for_images(num_images)
    device = run.accelerator.device
    request = PreviewRequest(
        num_images=num_images,
        seed=seed,
        shape=run.shape,
        device=device,
        cond=cond,
        null_cond=run.conditions.null(device),
        data=run.data.train,
        decode=run.decode,
        **settings,
    )
    return run.objective.preview(run.ema.model, request), labels


def write_grid(run: Run, step: int):
    """A grid from the EMA model with fixed noise (seed --seed), a column per class when conditional (clips: a row
    each, with their GIF and MP4), and the denoising path of its first images (clips: first frames) next to it
    (<name>_denoising.png, _trajectories.png, _denoising.gif)."""
    n, path = run.train_args.num_sample_images, grid_path(run, step)
    if not n:
        return
    recorder = DenoisingRecorder(max_samples=min(n, run.data.train.num_classes or 8))
    images, _ = preview(run, n, run.train_args.seed, callback=recorder)
    images, nrow = run.objective.grid_layout(images, run.data.train)
    files = save_samples(images, path, nrow=nrow)
    if recorder.num_steps:  # objectives that sample record their path; an autoencoder has none
        recorded = recorder.decode(run.decode) if run.decode else recorder
        files += write_denoising_figures(recorded, path.parent, path.stem).values()
    run.metrics.log_files(files, "samples")


def evaluate(run: Run, step: int):
    """--eval_metrics of the EMA model's images (uint8, decoded when latent) against the reference images: Inception
    FID/KID with reference statistics cached on disk, and the Fashion-MNIST classifier's metrics. Computed on the
    main process; writes fid.json."""
    run.ema.gather()
    accelerator, train_args = run.accelerator, run.train_args
    if not accelerator.is_main_process:
        return
    n = train_args.fid_num_samples
    images, labels = preview(run, n, train_args.seed + 1, progress=True)
    n_ref = train_args.fid_reference_samples or n
    metrics = parse_eval_metrics(train_args.eval_metrics)
    reference = run.data.reference
    values = evaluate_generated(images, labels, reference, n_ref, metrics, weights_path=train_args.fid_weights)
    run.metrics.log(step, {**values, "fid_num_samples": n, "fid_reference_samples": n_ref})
    result = {"step": step, **values, "num_samples": n, "reference_samples": n_ref, "reference": reference.key}
    write_text_atomically(Path(train_args.output_dir, "fid.json"), json.dumps(result, indent=2))
    run.metrics.log_files([Path(train_args.output_dir, "fid.json")])
    accelerator.print(", ".join(f"{k} {v:.4g}" for k, v in values.items()) + f" ({n} samples vs {n_ref} images)")
