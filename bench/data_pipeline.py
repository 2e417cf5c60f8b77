"""Share of the training step spent waiting for data, from Fashion-MNIST images and from cached latents.

    python bench/data_pipeline.py                                  # unet_s, batch 64, no workers (training's default)
    python bench/data_pipeline.py --num_workers 2 --model dit_tiny
    python bench/data_pipeline.py --device cuda --batch_size 256 --num_workers 4

Two sources, each read by the DataLoader that modules/training.py builds (ResumableBatchSampler, collate_examples,
its worker and pin-memory settings):
(a) images: `modules.data.load_train_data` (Fashion-MNIST at --resolution);
(b) latents: encode_latents.py with a tiny random VAE (the one of bench/encode_latents.py) writes --num_latents
    Fashion-MNIST images into a temporary directory, read back by `modules.latents.load_latent_data`.
A step is what training runs per batch: the batch to the device, `model_input` (for latents: z drawn from each
stored posterior and normalised), the class condition with CFG dropout, the flow-matching loss forward and backward,
and an AdamW step. Wait = time blocked in next(iterator). Each source runs --steps steps from its loader and the same
number on one batch fetched beforehand (the baseline without data), --repeats times, in turns (A B, then B A, ...).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import encode_latents
from bench.encode_latents import tiny_vae
from bench.report import Goal, finish, print_setting
from modules.config import DataArguments, FlowArguments, ModelArguments, TrainingArguments, help_field, parse_args
from modules.data.batches import model_input
from modules.data.conditions import Conditioning
from modules.data.images import collate_examples, load_train_data
from modules.data.latents import load_latent_data
from modules.data.order import ResumableBatchSampler, step_generator
from modules.networks.presets import build_model
from modules.objectives.flow import FlowObjective
from modules.training.loop import make_optimizer


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


def data_loader(dataset, args: BenchArguments, device: torch.device):
    """The loader modules/training.py builds, for one process."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ResumableBatchSampler(len(dataset), args.batch_size, args.seed),
        collate_fn=collate_examples,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )


class Source:
    """One data source with its loader, a model sized for it and the training step; records seconds per step."""

    def __init__(self, name: str, data, resolution: int, args: BenchArguments, device: torch.device):
        self.name, self.data, self.device = name, data, device
        torch.manual_seed(args.seed)
        model = build_model(ModelArguments(model=args.model), data.num_channels, resolution, data.num_classes)
        self.model = model.to(device).train()
        self.objective = FlowObjective(FlowArguments())
        self.optimizer = make_optimizer(self.model, TrainingArguments())
        self.conditioning = Conditioning(data, data.num_classes, drop_prob=TrainingArguments().cond_drop_prob)
        self.batches = iter(data_loader(data.dataset, args, device))
        self.fixed = next(self.batches)
        self.input = f"{data.num_channels}x{resolution}x{resolution}"
        self.step_number, self.seed = 0, args.seed
        self.step_s, self.wait_s, self.fixed_step_s = [], [], []

    def step(self, batch) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        generator = step_generator(self.seed, 0, self.step_number, 0, self.device)
        x0 = model_input(batch, self.data, generator, False)
        cond = self.conditioning.batch(batch, generator, self.device)
        self.objective.loss(self.model, x0, cond, generator).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        latents = load_latent_data(str(encode_latent_dataset(Path(tmp), args)))
        images = load_train_data(DataArguments(resolution=args.resolution))
        sources = [
            Source("Fashion-MNIST images", images, args.resolution, args, device),
            Source("cached latents (tiny VAE)", latents, latents.resolution, args, device),
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
