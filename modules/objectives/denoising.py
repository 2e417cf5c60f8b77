"""What the denoising objectives (flow matching, DDPM) share: sampling with classifier-free guidance, the
validation loss at fixed noise and times, previews from fixed noise."""

from __future__ import annotations

import torch

from modules.config import UserError
from modules.networks.conditioning import select_condition
from modules.networks.presets import build_model
from modules.objectives.protocol import PreviewRequest
from modules.objectives.samplers import generate_images, guided_model


class DenoisingObjective:
    """The members of the objective protocol (modules/objectives/protocol.py) that flow matching and DDPM share.
    A subclass sets `name` and `samplers` and implements `loss`, `loss_at` (the loss at given noise and times, what
    validation evaluates) and `run_sampler` (one of its samplers on a guided network)."""

    name: str
    samplers: tuple[str, ...] = ()

    def __init__(self, args):
        if not args.num_inference_steps > 0:
            raise UserError(f"--num_inference_steps must be positive, got {args.num_inference_steps}")
        if args.guidance_scale < 0:
            raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
        self.args = args

    def build_model(self, model_args, in_channels: int, resolution: int, num_classes: int = 0, text=None):
        """The `--model` preset (a UNet or a DiT) for the data."""
        return build_model(model_args, in_channels, resolution, num_classes, text)

    def loss_at(self, model, x0, cond, noise, t) -> torch.Tensor:
        raise NotImplementedError

    def run_sampler(self, sampler: str, fn, noise, steps: int, generators, callback) -> torch.Tensor:
        raise NotImplementedError

    def sample(
        self,
        model,
        noise,
        cond=None,
        num_inference_steps=None,
        sampler=None,
        guidance_scale=None,
        generators=None,
        null_cond=None,
        callback=None,
    ):
        """From pure noise to x0. `generators`: one per sample, for samplers that draw noise on the way."""
        a = self.args
        fn = guided_model(model, cond, a.guidance_scale if guidance_scale is None else guidance_scale, null_cond)
        sampler = sampler or a.sampler
        if sampler not in self.samplers:
            raise ValueError(f"{self.name} models sample with {', '.join(self.samplers)}, not '{sampler}'")
        return self.run_sampler(sampler, fn, noise, num_inference_steps or a.num_inference_steps, generators, callback)

    def validation(self, model, x0: torch.Tensor, cond, seed: int, num_bins: int) -> dict:
        """Loss on held-out x0 at fixed noise and a fixed grid of t: overall, and per t-bin as val_loss_t<centre>."""
        result = validation_loss(model, self, x0, cond, seed, num_bins)
        bins = {f"val_loss_t{t:.2f}": v for t, v in zip(result["val_t"], result["val_loss_bins"], strict=True)}
        return {"val_loss": result["val_loss"], **bins}

    def preview(self, model, request: PreviewRequest) -> torch.Tensor:
        """Samples from fixed noise (image i seeded by (seed, i)), uint8 (N, C, H, W)."""
        r = request
        return generate_images(
            model,
            self,
            r.num_images,
            r.seed,
            r.shape,
            r.batch_size,
            r.cond,
            r.device,
            progress=r.progress,
            decode=r.decode,
            callback=r.callback,
            null_cond=r.null_cond,
        )

    def grid_layout(self, images: torch.Tensor, data) -> tuple[torch.Tensor, int | None]:
        """A column per class for class-conditional previews."""
        return images, data.num_classes or None


@torch.no_grad()
def validation_loss(
    model, objective, images: torch.Tensor, labels, seed: int, num_bins: int = 10, batch_size: int = 256
) -> dict:
    """The objective's loss on held-out images at fixed times and fixed noise, so values compare across steps.

    Every image is evaluated at the centre of each of `num_bins` equal t-bins, t_j = (j + 1/2) / num_bins, with noise
    seeded by (seed, bin). Returns {"val_loss": mean, "val_loss_bins": [mean per bin], "val_t": [t_j]}.
    """
    device = next(model.parameters()).device
    t_grid = [(j + 0.5) / num_bins for j in range(num_bins)]
    per_bin = torch.zeros(num_bins, dtype=torch.float64)
    for j, t in enumerate(t_grid):
        all_noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + j))
        for first in range(0, len(images), batch_size):
            x0 = images[first : first + batch_size].to(device)
            noise = all_noise[first : first + len(x0)].to(device)
            cond = None
            if labels is not None:  # class labels, or a text condition (modules/networks/conditioning.py)
                cond = select_condition(labels, slice(first, first + len(x0)))
                cond = {k: v.to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(device)
            t_batch = torch.full((len(x0),), t, device=device)
            per_bin[j] += objective.loss_at(model, x0, cond, noise, t_batch).double().sum().cpu()
    per_bin /= len(images)
    return {"val_loss": per_bin.mean().item(), "val_loss_bins": per_bin.tolist(), "val_t": t_grid}
