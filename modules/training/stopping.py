"""Stopping a run on purpose, and refusing to go on when it has diverged.

Preemption: SIGTERM or SIGUSR1 (what SLURM and most schedulers send before they kill a job), or --max_train_minutes,
ask every process to save a checkpoint at the next step boundary and exit 0; rerunning the same command with
--resume_from_checkpoint latest continues exactly. A signal may reach only some processes, so the request is
agreed on with one small all-reduce per optimizer step, together with the non-finite check below.

Outlook: which limit ends the run first, --max_train_steps or --max_train_minutes at the speed so far, at what step
and when; the progress bar counts to that step, and each log line carries its ETA.

Non-finite guard: a step whose loss or gradient norm is NaN or inf on any process is skipped on every process (no
optimizer, LR schedule or EMA update), counted and logged; after --max_nonfinite_steps such steps in a row the run
stops with an error naming the step and the last complete checkpoint. Under fp16 the gradient scaler already skips
overflowing steps (and lowers its scale), so there the step goes to it and is counted when it skipped.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from modules.config import UserError

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


class StopRequest:
    """Records SIGTERM / SIGUSR1 and the wall-clock limit; `reason()` says why this process wants to stop, if it
    does. Handlers are installed for the life of the run and the previous ones restored by `close()`."""

    def __init__(self, max_minutes: float | None = None):
        self.received: str | None = None
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.max_minutes = max_minutes
        self.previous = {}
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is None:  # not on this platform
                continue
            try:
                self.previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass

    def _handle(self, number, frame):
        self.received = signal.Signals(number).name

    def reason(self) -> str | None:
        if self.received:
            return self.received
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return f"--max_train_minutes {self.max_minutes:g}"
        return None

    def seconds_left(self) -> float | None:
        """Seconds until --max_train_minutes is up (0 once it is), or None without a time limit."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def close(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class Outlook:
    """Where the run is projected to end: at step `end_step`, in `eta_s` seconds, stopped by the time limit
    (`by_time`) or by --max_train_steps."""

    end_step: int
    eta_s: float
    by_time: bool


def outlook(done: int, steps_run: int, elapsed_s: float, max_steps: int, seconds_left: float | None) -> Outlook:
    """The limit that binds first, at the speed of this launch so far (`steps_run` steps in `elapsed_s` seconds, the
    duties between them included): --max_train_steps, or the time limit with `seconds_left` (None: none). A step
    that starts before the time is up still runs: the time limit ends the run at the first step boundary after it."""
    rate = steps_run / elapsed_s if steps_run > 0 and elapsed_s > 0 else 0.0  # steps per second
    steps_eta = (max_steps - done) / rate if rate else math.inf
    if seconds_left is None or steps_eta <= seconds_left:
        return Outlook(max_steps, steps_eta, False)
    return Outlook(min(max_steps, done + math.ceil(rate * seconds_left)), seconds_left, True)


class NonFiniteGuard:
    """Counts skipped steps; raises `TrainingDiverged` after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def update(self, skipped: bool, step: int, last_checkpoint) -> None:
        """`last_checkpoint()`: the newest complete checkpoint, or None (looked up only when stopping)."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            last = last_checkpoint()
            where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped at step {step}: the loss or the gradients were not finite for {self.in_a_row} "
                f"steps in a row (--max_nonfinite_steps {self.limit}); {where}. Lower --learning_rate, check the data "
                "or use bf16 instead of fp16, then resume from that checkpoint"
            )


def agree(accelerator, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
    """(any process saw a non-finite value, any process wants to stop), the same on every process."""
    flags = torch.tensor([float(nonfinite), float(stop)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    nonfinite, stop = flags.tolist()
    return nonfinite > 0, stop > 0
