"""Share of the training step spent waiting for data, from Fashion-MNIST images and from cached latents.

    python bench/data_pipeline.py                                  # unet_s, batch 64, no workers (training's default)
    python bench/data_pipeline.py --num_workers 2 --model dit_tiny
    python bench/data_pipeline.py --device cuda --batch_size 256 --num_workers 4

Two sources, each read by training's own DataLoader (`modules.data.batches.train_loader` over a
ResumableBatchSampler, with its worker and pin-memory settings):
(a) images: `modules.data.sources.load_train_data` (Fashion-MNIST at --resolution);
(b) latents: encode_latents.py with a tiny random VAE (the one of bench/encode_latents.py) writes --num_latents
    Fashion-MNIST images into a temporary directory, read back by `modules.data.latents.load_latent_data`.
A step is training's own `modules.training.step.optimizer_step` on one batch: the batch to the device,
`model_input` (for latents: z drawn from each stored posterior and normalised), the class condition with CFG
dropout, the flow-matching loss forward and backward, clipping, the finite check and an AdamW step.
Wait = time blocked in next(iterator). Each source runs --steps steps from its loader and the same number on one
batch fetched beforehand (the baseline without data), --repeats times, in turns (A B, then B A, ...).
Medians over the repeats of wait / step time (goal: < --max_wait_share) and of step time from the loader over the
baseline's next to it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import encode_latents
from bench.encode_latents import tiny_vae
from bench.report import Goal, finish, print_setting
from modules.config import DataArguments, FlowArguments, ModelArguments, TrainingArguments, help_field, parse_args
from modules.data.batches import train_loader
from modules.data.conditions import ConditionSource
from modules.data.latents import load_latent_data
from modules.data.order import ResumableBatchSampler
from modules.data.sources import load_train_data
from modules.networks.presets import build_model
from modules.objectives.flow import FlowObjective
from modules.training.run import Run, RunData
from modules.training.setup import make_optimizer
from modules.training.step import optimizer_step
from modules.training.stopping import StopRequest


@dataclass
class BenchArguments:
    model: str = help_field("Preset trained on both sources (class-conditional).", default="unet_s")
    batch_size: int = help_field("Images per step.", default=64)
    num_workers: int = help_field("DataLoader worker processes (training's --dataloader_num_workers).", default=0)
    steps: int = help_field("Timed steps per repeat, from the loader and from the fixed batch alike.", default=8)
    warmup: int = help_field("Untimed steps first (worker start-up, first batches).", default=2)
    repeats: int = help_field("Timed runs of each way, interleaved.", default=4)
    resolution: int = help_field("Image size (the latents are smaller by the VAE's factor).", default=32)
    num_latents: int = help_field("Fashion-MNIST images encoded into the latent dataset.", default=2048)
    device: str = help_field("cpu or cuda.", default="cpu")
    max_wait_share: float = help_field(
        "Goal: the largest acceptable share of step time spent waiting for data.", default=0.05
    )
    no_goals: bool = help_field("Only report: exit 0 even when a goal is missed.", default=False)
    seed: int = help_field("Seed of weights, data order and noise.", default=0)


def encode_latent_dataset(directory: Path, args: BenchArguments) -> Path:
    out = directory / "latents"
    argv = [
        "--vae",
        tiny_vae(directory / "vae"),
        "--output_dir",
        str(out),
        "--dataset_name",
        "fashion_mnist",
        "--max_train_samples",
        str(args.num_latents),
        "--resolution",
        str(args.resolution),
    ]
    encode_latents.main(argv)
    return out


class Source:
    """One data source with its loader, a model sized for it and training's step; records seconds per step."""

    def __init__(self, name: str, data, resolution: int, args: BenchArguments, accelerator, stop_request):
        self.name, self.data, self.device = name, data, accelerator.device
        torch.manual_seed(args.seed)
        model_args = ModelArguments(model=args.model)
        train_args = TrainingArguments(seed=args.seed, train_batch_size=args.batch_size)
        model = build_model(model_args, data.num_channels, resolution, data.num_classes).to(self.device).train()
        model, optimizer = accelerator.prepare(model, make_optimizer(model, train_args))
        sampler = ResumableBatchSampler(len(data.dataset), args.batch_size, args.seed)
        loader = train_loader(
            data.dataset, sampler, args.seed, args.num_workers, pin_memory=self.device.type == "cuda"
        )
        self.run = Run(
            data_args=DataArguments(),
            model_args=model_args,
            train_args=train_args,
            objective=FlowObjective(FlowArguments()),
            data=RunData(data),
            conditions=ConditionSource(data, data.num_classes, drop_prob=train_args.cond_drop_prob),
            stop_request=stop_request,
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
        )
        self.batches = iter(loader)
        self.fixed = next(self.batches)
        self.input = f"{data.num_channels}x{resolution}x{resolution}"
        self.step_number = 0
        self.step_s, self.wait_s, self.fixed_step_s = [], [], []

    def step(self, batch) -> None:
        optimizer_step(self.run, [batch], self.step_number)
        if self.device.type == "cuda":  # training syncs every step too (its finite-loss check)
            torch.cuda.synchronize(self.device)
        self.step_number += 1

    def timed(self, steps: int, from_loader: bool) -> None:
        wait = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            if from_loader:
                before = time.perf_counter()
                batch = next(self.batches)
                wait += time.perf_counter() - before
            self.step(batch if from_loader else self.fixed)
        seconds = (time.perf_counter() - start) / steps
        if from_loader:
            self.step_s.append(seconds)
            self.wait_s.append(wait / steps)
        else:
            self.fixed_step_s.append(seconds)


def main(argv=None):
    (args,) = parse_args((BenchArguments,), argv, description=__doc__)
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = accelerator.device
    with tempfile.TemporaryDirectory() as tmp, StopRequest() as stop_request:
        latents = load_latent_data(str(encode_latent_dataset(Path(tmp), args)))
        images = load_train_data(DataArguments(resolution=args.resolution))
        sources = [
            Source("Fashion-MNIST images", images, args.resolution, args, accelerator, stop_request),
            Source("cached latents (tiny VAE)", latents, latents.resolution, args, accelerator, stop_request),
        ]
        for source in sources:
            for _ in range(args.warmup):
                source.step(next(source.batches))
        for repeat in range(args.repeats):
            for source in sources:
                for from_loader in (True, False) if repeat % 2 == 0 else (False, True):
                    source.timed(args.steps, from_loader)

    print_setting(__file__, argv, device)
    print(
        f"model {args.model}, batch {args.batch_size}, {args.num_workers} workers, {args.repeats} repeats x "
        f"{args.steps} steps after {args.warmup} warm-up steps; medians over the repeats\n"
    )
    rows, goals = [], []
    for s in sources:
        step, wait, fixed = (statistics.median(v) for v in (s.step_s, s.wait_s, s.fixed_step_s))
        share = statistics.median(w / t for w, t in zip(s.wait_s, s.step_s, strict=True))
        slowdown = statistics.median(t / f for t, f in zip(s.step_s, s.fixed_step_s, strict=True))
        rows.append(
            [
                s.name,
                f"{len(s.data.dataset):,}",
                s.input,
                f"{1e3 * step:.1f}",
                f"{1e3 * wait:.2f}",
                f"{100 * share:.2f} %",
                f"{1e3 * fixed:.1f}",
                f"{slowdown:.3f}",
            ]
        )
        goals.append(Goal(f"wait share, {s.name}", share, args.max_wait_share, at_least=False, percent=True))
    headers = [
        "data",
        "items",
        "model input",
        "step ms (loader)",
        "wait ms",
        "wait share",
        "step ms (fixed batch)",
        "loader / fixed",
    ]
    finish(headers, rows, device, goals, args.no_goals)


if __name__ == "__main__":
    main()
