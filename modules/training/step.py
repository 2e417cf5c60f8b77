"""One optimizer step: forward and backward over the micro-batches of gradient accumulation, then the update,
skipped on every process when any process saw a NaN or inf loss or gradient (modules/training/stopping.py).

The precisions and sharding differ only in who steps: Accelerate's fp16 gradient scaler skips overflowing steps
itself, DeepSpeed steps inside `backward` and skips non-finite steps itself, and otherwise the guard decides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from modules.data.batches import model_input
from modules.data.order import step_generator
from modules.training.run import Run
from modules.training.stopping import agree


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's mean loss over its micro-batches: 0-d, on the device
    grad_norm: torch.Tensor | None  # before clipping; None when DeepSpeed does not report it
    skipped: bool  # the model was not updated (a non-finite loss or gradient, or fp16 overflow)
    stop: bool  # some process asked to stop (a signal or the time limit), agreed on by every process


def optimizer_step(run: Run, micro_batches: Iterable[dict], step: int) -> StepResult:
    """Train on `micro_batches` (gradient_accumulation_steps of them) as step `step`. Every random number of a
    micro-batch comes from a generator seeded by (seed, rank, step, micro-batch), so a resumed run replays it."""
    accelerator, train_args = run.accelerator, run.train_args
    device, rank = accelerator.device, accelerator.process_index
    step_loss = torch.zeros((), device=device)
    grad_norm, skipped, stop = None, False, False
    for micro, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        generator = step_generator(train_args.seed, rank, step, micro, device)
        x0 = model_input(batch, run.data.train, generator, run.data_args.random_flip)
        cond = run.conditions.batch(batch, generator, device)
        paired = {"noise": batch["noise"]} if "noise" in batch else {}  # a pairs dataset's noise (reflow), not drawn
        with accelerator.accumulate(run.model):
            with run.compute(), run.alignment.capture():  # REPA reads the hidden states of this forward
                loss = run.objective.loss(run.model, x0, cond, generator, **paired).mean()
                loss = loss + run.alignment.loss(run.unwrapped, x0, batch)
            accelerator.backward(loss)
            step_loss += loss.detach() / train_args.gradient_accumulation_steps
            if accelerator.sync_gradients:
                grad_norm, skipped, stop = update(run, step_loss)
            run.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, grad_norm, skipped, stop)


def update(run: Run, step_loss: torch.Tensor) -> tuple[torch.Tensor | None, bool, bool]:
    """Clip the gradients, agree with every process on non-finite values and stop requests, and step the optimizer
    unless the step must be skipped: (gradient norm, skipped, stop)."""
    accelerator, optimizer = run.accelerator, run.optimizer
    # The gradient norm (clipped when --max_grad_norm > 0) is what the guard checks with the loss.
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), run.train_args.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    checked = step_loss if grad_norm is None else step_loss + grad_norm  # None: DeepSpeed did not say
    nonfinite, stop = agree(accelerator, not bool(torch.isfinite(checked)), run.stop_request.reason() is not None)
    if accelerator.scaler is not None or run.deepspeed:
        # fp16's gradient scaler skips overflowing steps itself; DeepSpeed has stepped in backward, skipping a step
        # whose gradients are not finite, and its optimizer.step() does nothing.
        optimizer.step()
        return grad_norm, optimizer.step_was_skipped, stop
    if nonfinite:
        return grad_norm, True, stop
    optimizer.step()
    return grad_norm, False, stop
