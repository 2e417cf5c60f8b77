"""Training throughput of our UNet and DiT presets against diffusers' UNet2DModel and DiTTransformer2DModel.

    python bench/train_throughput.py                            # unet_s on 32x32x1, dit_tiny on 32x32x4, CPU
    python bench/train_throughput.py --models dit_b --resolution 32 --channels 4 --patch_size 2 \\
        --device cuda --mixed_precision bf16 --batch_size 256   # DiT-B/2 on SD-VAE-sized latents, with MFU

One step: the flow-matching loss (modules.flow.FlowObjective) forward and backward, then an AdamW step
(modules.training.setup.make_optimizer), on a fixed random batch with class labels (10 classes and the null class).
Each preset is paired with the diffusers model of the same layout, at the same resolution, channels, batch,
optimizer and precision:
  unet_*  UNet2DModel with the same block_out_channels, layers_per_block, attention levels, head width and dropout,
          scale-shift time conditioning and a class embedding: the same parameter count.
  dit_*   DiTTransformer2DModel of the same width, heads, depth and patch size, so the same matmul FLOPs; each of its
          blocks carries its own time and class embedder, which adds 7-11 % parameters. `--match params` takes the
          depth whose parameter count is closest to ours instead (then diffusers does fewer FLOPs).
The two models of a pair take turns, --steps timed steps each, --repeats times (A B, then B A, and so on). Each
repeat gives a ratio ours / diffusers of two runs next to each other in time, so under the same load from other work
on a shared CPU; the goal is on the median of these ratios (the ratio of the best repeats is shown too).
Goals: ours / diffusers >= --unet_goal for UNets, >= --dit_goal for DiTs. The CPU default is one thread (--threads):
with two threads on a two-core machine shared with other work, repeats vary tenfold and no statistic is stable.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Goal, finish, print_setting
from modules.config import FlowArguments, ModelArguments, TrainingArguments, help_field, parse_args
from modules.networks.presets import build_model
from modules.networks.unet import UNET_PRESETS, group_norm
from modules.objectives.flow import FlowObjective
from modules.training.flops import model_flops_per_image, peak_tflops, training_flops_per_image
from modules.training.setup import make_optimizer

NUM_CLASSES = 10
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchArguments:
    models: str = help_field(
        "Comma-separated presets of ours, each timed against its diffusers twin.", default="unet_s,dit_tiny"
    )
    batch_size: int = help_field("Images per step.", default=32)
    resolution: int = help_field("Image (or latent) height and width.", default=32)
    channels: int | None = help_field(
        "Input channels. Default: 1 for UNets (Fashion-MNIST), 4 for DiTs (latents).", default=None
    )
    patch_size: int = help_field("DiT patch size.", default=2)
    match: Literal["shape", "params"] = help_field(
        "DiT twin: the same depth as ours (shape) or the depth with the closest parameter count (params).",
        default="shape",
    )
    steps: int = help_field("Timed steps per repeat.", default=2)
    warmup: int = help_field("Untimed steps of each model first.", default=2)
    repeats: int = help_field("Timed runs of each model, interleaved.", default=8)
    threads: int = help_field(
        "torch CPU threads; 0: torch's default. One keeps the ratios steady on a shared CPU, where a thread that "
        "loses its core stalls the others at every parallel op.",
        default=1,
    )
    device: str = help_field("cpu or cuda.", default="cpu")
    mixed_precision: Literal["no", "bf16", "fp16"] = help_field("Autocast precision.", default="no")
    torch_compile: bool = help_field("torch.compile both models.", default=False)
    channels_last: bool = help_field("Both models and the batch in channels_last memory format.", default=False)
    unet_goal: float = help_field("Least acceptable img/s ratio ours / diffusers for UNets.", default=1.0)
    dit_goal: float = help_field("Least acceptable img/s ratio ours / diffusers for DiTs.", default=1.2)
    no_goals: bool = help_field("Only report: exit 0 even when a goal is missed.", default=False)
    seed: int = help_field("Seed of weights and batch.", default=0)


class DiffusersTwin(nn.Module):
    """A diffusers UNet2DModel or DiTTransformer2DModel called as ours are: (x, t in [0, 1], class labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, cond):
        return self.model(x, t * 1000, class_labels=cond, return_dict=False)[0]  # its timesteps count to 1000


def unet_twin(ours) -> nn.Module:
    from diffusers import UNet2DModel

    c = ours.config
    attention = [c.sample_size // 2**level in c.attention_resolutions for level in range(len(c.channel_mult))]
    groups = group_norm(c.base_channels).num_groups  # divides every level's width, a multiple of the base
    return UNet2DModel(
        sample_size=c.sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(c.base_channels * m for m in c.channel_mult),
        layers_per_block=c.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=c.num_head_channels,
        norm_num_groups=groups,
        attn_norm_num_groups=groups,
        resnet_time_scale_shift="scale_shift",
        dropout=c.dropout,
        num_class_embeds=NUM_CLASSES + 1,
    )


def dit_twin(ours, match: str) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    c = ours.config
    make = lambda depth: DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=depth,
        sample_size=c.sample_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    depth = c.depth
    if match == "params":  # parameters grow by the same amount per block
        one, two = (sum(p.numel() for p in make(d).parameters()) for d in (1, 2))
        target = sum(p.numel() for p in ours.parameters())
        depth = min(range(1, 2 * c.depth + 1), key=lambda d: abs(one + (d - 1) * (two - one) - target))
    return make(depth)


def flops_per_image(model, objective, x0, labels, generator) -> float:
    """Training FLOPs per image as training counts them: on a meta-device copy, so attention takes the plain path
    whatever kernel runs (on CPU the fused attention's backward would go uncounted)."""
    if not isinstance(model, DiffusersTwin):
        return model_flops_per_image(model, objective, x0, labels, generator)
    with torch.device("meta"):
        meta = DiffusersTwin(type(model.model).from_config(dict(model.model.config)))
    return training_flops_per_image(meta, objective, x0.to("meta"), labels.to("meta"), generator)


class Trainee:
    """A model with its optimizer, batch and generator: `step()` runs one training step."""

    def __init__(self, name, model, args: BenchArguments, x0, labels, device):
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.name, self.model = name, model.to(device, memory_format=memory_format).train()
        self.x0, self.labels = x0.contiguous(memory_format=memory_format), labels
        self.params = sum(p.numel() for p in model.parameters())
        self.objective = FlowObjective(FlowArguments())
        self.generator = torch.Generator(device).manual_seed(args.seed)
        self.flops = flops_per_image(model, self.objective, self.x0[:2], labels[:2], self.generator)
        self.optimizer = make_optimizer(model, TrainingArguments())
        if args.torch_compile:
            model.compile()  # in place, as training does
        dtype = DTYPES.get(args.mixed_precision)
        self.autocast = lambda: torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
        self.rates, self.peak_mib = [], 0.0

    def step(self):
        with self.autocast():
            loss = self.objective.loss(self.model, self.x0, self.labels, self.generator).mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_mib(self) -> float:
        tensors = [*self.model.parameters(), *(v for s in self.optimizer.state.values() for v in s.values())]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20

    def timed(self, steps: int, device: torch.device):
        """Run `steps` steps; record img/s and, on CUDA, this model's peak: its own weights and optimizer state
        plus what its steps allocate on top of what is resident (the other model's weights are not counted)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            extra = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            self.peak_mib = max(self.peak_mib, self.resident_mib() + extra)
        self.rates.append(steps * len(self.x0) / (time.perf_counter() - start))


def make_pair(preset: str, args: BenchArguments, device: torch.device) -> tuple[Trainee, Trainee]:
    is_unet = preset in UNET_PRESETS
    channels = args.channels or (1 if is_unet else 4)
    torch.manual_seed(args.seed)
    ours = build_model(
        ModelArguments(model=preset, patch_size=args.patch_size), channels, args.resolution, NUM_CLASSES
    )
    twin = DiffusersTwin(unet_twin(ours) if is_unet else dit_twin(ours, args.match))
    g = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(args.batch_size, channels, args.resolution, args.resolution, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES + 1, (args.batch_size,), generator=g).to(device)  # the null class too
    twin_name = f"diffusers {type(twin.model).__name__}"
    return Trainee(preset, ours, args, x0, labels, device), Trainee(twin_name, twin, args, x0, labels, device)


def main(argv=None):
    (args,) = parse_args((BenchArguments,), argv, description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pairs = [make_pair(name.strip(), args, device) for name in args.models.split(",") if name.strip()]
    for trainee in (t for pair in pairs for t in pair):
        for _ in range(args.warmup):
            trainee.step()
    for repeat in range(args.repeats):
        for pair in pairs:
            for trainee in pair if repeat % 2 == 0 else reversed(pair):
                trainee.timed(args.steps, device)

    print_setting(__file__, argv, device)
    peak, r = peak_tflops(device, args.mixed_precision), args.resolution
    print(
        f"batch {args.batch_size}, precision {args.mixed_precision}, compile {args.torch_compile}, channels_last "
        f"{args.channels_last}; {args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up steps; "
        "TFLOP/s and MFU at the best repeat; ratios: median over repeats of ours / diffusers\n"
    )
    rows, goals = [], []
    for ours, twin in pairs:
        for t in (ours, twin):
            tflops = t.flops * max(t.rates) / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            memory = f"{t.peak_mib:.0f}" if device.type == "cuda" else "-"
            rates = f"{max(t.rates):.1f}", f"{statistics.median(t.rates):.1f}"
            rows.append(
                [
                    t.name,
                    f"{t.x0.shape[1]}x{r}x{r}",
                    f"{t.params:,}",
                    f"{t.flops / 1e9:.2f}",
                    *rates,
                    f"{tflops:.3f}",
                    mfu,
                    memory,
                ]
            )
        ratio = statistics.median(a / b for a, b in zip(ours.rates, twin.rates, strict=True))
        best = max(ours.rates) / max(twin.rates)
        target = args.unet_goal if ours.name in UNET_PRESETS else args.dit_goal
        name = f"img/s {ours.name} / {twin.name} (of the best: {best:.3f}; params {ours.params / twin.params:.3f}x)"
        goals.append(Goal(name, ratio, target))
    headers = [
        "model",
        "input",
        "params",
        "train GFLOP/img",
        "img/s best",
        "img/s median",
        "TFLOP/s",
        "MFU",
        "peak MiB (own)",
    ]
    finish(headers, rows, device, goals, args.no_goals)


if __name__ == "__main__":
    main()
