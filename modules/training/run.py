"""The state of one training run: what `setup_run` builds, the optimizer step uses and the duties between steps
update. One object instead of closures, so that every part of the loop is a plain function of it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.config import DataArguments, ModelArguments, TrainingArguments
from modules.data.conditions import ConditionSource
from modules.objectives.protocol import Objective
from modules.training.alignment import NoAlignment
from modules.training.ema import EMA
from modules.training.stopping import NonFiniteGuard, StopRequest
from modules.training.tracking import LogWindow, MetricsLog


@dataclass
class RunData:
    """The data a run opens: the training set, the held-out set for the validation loss, the images FID compares
    with, for a latent dataset the record that decodes its latents (VAE, channel statistics), and for a pairs
    dataset the teacher the student learns from, as its model records it."""

    train: Any  # modules.data.images.TrainData, modules.data.latents.LatentData or modules.data.pairs.PairsData
    held_out: Any = None
    reference: Any = None
    latent: dict | None = None
    reflow: dict | None = None


@dataclass
class Run:
    """Everything a training run holds. Fields with defaults are filled by `setup_run` (the tests of the optimizer
    step fill only what it reads)."""

    # What to train, on what: the arguments, the objective and the data.
    data_args: DataArguments
    model_args: ModelArguments
    train_args: TrainingArguments
    objective: Objective
    data: RunData
    conditions: ConditionSource
    stop_request: StopRequest  # SIGTERM / SIGUSR1 / --max_train_minutes, as this process saw them
    # The model and what trains it, as Accelerate prepared them.
    accelerator: Any
    model: Any  # what the optimizer steps (wrapped for DDP, FSDP or DeepSpeed)
    optimizer: Any
    ema: EMA | None = None
    profiles: list[EMA] = field(default_factory=list)  # --ema_phema_stds: the post-hoc EMA's power-function EMAs
    alignment: Any = field(default_factory=NoAlignment)  # --repa_encoder (modules/training/alignment.py)
    lr_scheduler: Any = None
    unwrapped: Any = None  # the model itself, whose weights the EMA averages
    compute: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around forward and loss
    deepspeed: bool = False  # DeepSpeed steps the optimizer inside backward and skips non-finite steps itself
    batches: Iterator[dict] = field(default_factory=lambda: iter(()))  # training batches, from the start step
    # Where it writes, and what it shows.
    out: Path = Path("runs/default")
    shape: tuple[int, ...] = ()  # (C, H, W) of what the model generates, (F, C, H, W) for clips
    decode: Callable | None = None  # latents -> images in [-1, 1], on the main process of a latent run
    metrics: MetricsLog | None = None
    progress: Any = None  # the progress bar
    pusher: Any = None  # the background Hub uploader (modules.artifacts.hub.HubPusher), on the main process
    text: Any = None  # the text conditioner (modules.networks.text.TextConditioner) of a text model
    condition: str = ""  # what the model is conditioned on, and why, for the start-up line
    # Where it is, and how it goes.
    stop_reason: str | None = None
    guard: NonFiniteGuard | None = None  # counts non-finite steps; made by start_logging from --max_nonfinite_steps
    window: LogWindow | None = None
    start_step: int = 0
    images_seen: int = 0
    images_per_step: int = 0  # the global batch: per process x processes x accumulation
    grad_norm: Any = None  # of the last step
    flops_per_image: float = 0.0
    peak_tflops: float | None = None
    seconds_before: float = 0.0  # training time of the earlier parts of a resumed run
    resumed_wandb_run: dict | None = None  # the wandb run a resumed run continues (id, entity), from its checkpoint
    started: float = field(default_factory=time.perf_counter)
    validation_set: Any = None  # held-out images and conditions, decoded at the first validation

    def train_seconds(self) -> float:
        """Training time so far, over every resumed part of the run."""
        return self.seconds_before + time.perf_counter() - self.started

    def last_step(self, done: int) -> bool:
        return done == self.train_args.max_train_steps
