"""The objective protocol: every member the training loop, the samplers and the tools ask of an objective.

An objective is the math of one way to train a network, kept apart from the network and from the loop:
`flow.FlowObjective` (flow matching), `ddpm.DDPMObjective` (DDPM on diffusers' schedules) and
`autoencoder.VAEObjective` (the KL-VAE). A new objective implements these members and registers its name in
`registry.OBJECTIVES`; the loop never asks which objective it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class PreviewRequest:
    """What a sample grid or an evaluation asks an objective to show: images start..start+num_images-1 of `seed`."""

    num_images: int
    seed: int
    shape: tuple[int, ...]  # (C, H, W) of what the model generates, (F, C, H, W) for clips; latents with `decode`
    device: torch.device | str = "cpu"
    cond: Any = None  # one condition per image: class labels, a text dict (modules/networks/conditioning.py), None
    null_cond: dict | None = None  # a text model's unconditional condition, for classifier-free guidance
    data: Any = None  # the training data (an autoencoder shows reconstructions of its first images)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1]
    callback: Callable | None = None  # called by the sampler at each step (modules/artifacts/visualize.py records it)
    progress: bool = False  # show a progress bar
    batch_size: int = 64  # images per forward pass; it does not change the images


@runtime_checkable
class Objective(Protocol):
    """What every objective provides. `args` is its settings dataclass (modules/config.py)."""

    name: str
    """Recorded in objective.json; `registry.objective_from_config` finds the class by it."""
    args: Any
    """The objective's settings (FlowArguments, DDPMArguments, VAEArguments), recorded in objective.json."""
    samplers: tuple[str, ...]
    """The sampler names `sample` takes; empty for an objective that does not generate."""

    def build_model(
        self, model_args, in_channels: int, resolution: int, num_classes: int = 0, text=None, num_frames: int = 0
    ):
        """The network this objective trains, sized for the data (a diffusers ModelMixin); `num_frames`: the clip
        length of clip data, 0 for images."""

    def check_launch(self, weight_sharding: str | None) -> None:
        """Refuse, with a UserError, a launch this objective cannot train under; asked once Accelerate has started,
        before the run writes anything. `weight_sharding` names how the network's weights are split over the
        processes ("FSDP", "DeepSpeed ZeRO-3"), or is None when every process holds them whole (one process, DDP,
        DeepSpeed ZeRO-1 and ZeRO-2)."""

    def loss(self, model, x0: torch.Tensor, cond, generator: torch.Generator, noise=None) -> torch.Tensor:
        """Per-sample training loss (B,) in float32; every random number is drawn from `generator`. `noise`: the
        noise paired with x0 when the data bring it (a reflow pairs dataset, given only to an objective whose
        `refuses_pairs()` is None); drawn otherwise."""

    def refuses_pairs(self) -> str | None:
        """Why this objective, with its settings, cannot train on noise paired with x0 (--pairs_dataset), said for
        the user; None when it can."""

    def sample(self, model, noise: torch.Tensor, cond=None, **settings) -> torch.Tensor:
        """From noise to x0, images (B, C, H, W) or clips (B, F, C, H, W) as the noise (settings: sampler,
        num_inference_steps, guidance_scale, guidance_interval, guide_model, generators, null_cond, callback); an
        objective that does not generate raises UserError."""

    def validation(self, model, x0: torch.Tensor, cond, seed: int, num_bins: int, noise=None) -> dict[str, float]:
        """Metrics of held-out data (at least "val_loss"), at fixed noise so that values compare across steps: the
        noise paired with x0 when held-out pairs bring it (given only as `loss`'s), else drawn from `seed`."""

    def preview(self, model, request: PreviewRequest) -> torch.Tensor:
        """What grids and FID look at: `request.num_images` images, uint8 (N, C, H, W), or clips (N, F, C, H, W)."""

    def grid_layout(self, images: torch.Tensor, data) -> tuple[torch.Tensor, int | None]:
        """The images of a sample grid in the order to show them, and the number per row (None: square)."""
