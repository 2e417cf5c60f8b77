"""What the denoising objectives (flow matching, DDPM) share: sampling with classifier-free guidance, the
validation loss at fixed noise and times, previews from fixed noise."""

from __future__ import annotations

import functools

import torch

from modules.config import UserError
from modules.networks.conditioning import select_condition
from modules.networks.presets import build_model, is_video_model
from modules.objectives.frames import shared_noise_loss, shared_noise_sample
from modules.objectives.protocol import PreviewRequest
from modules.objectives.samplers import generate_images, guided_model, parse_guidance_interval, sampler_problem


class DenoisingObjective:
    """The members of the objective protocol (modules/objectives/protocol.py) that flow matching and DDPM share,
    with the shared-noise frame trainer (modules/objectives/frames.py) when `args.shared_noise`. A subclass sets
    `name` and `samplers` and implements `draw` (the noise and times of a training batch), `loss_and_estimate` (the
    loss at given noise and times, and the x0 estimate) and `run_sampler` (one of its samplers on a guided
    network)."""

    name: str
    samplers: tuple[str, ...] = ()
    interval_embedding = False  # whether the network also takes r, the start of an average velocity's interval

    def __init__(self, args):
        if not args.num_inference_steps > 0:
            raise UserError(f"--num_inference_steps must be positive, got {args.num_inference_steps}")
        if args.guidance_scale < 0:
            raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
        try:
            parse_guidance_interval(args.guidance_interval)
        except ValueError as e:
            raise UserError(f"--guidance_interval: {e}") from None
        if problem := sampler_problem(args.sampler, self.name, self.samplers):  # at start-up, not at the first grid
            raise UserError(f"--sampler {problem}")
        self.args = args

    def check_launch(self, weight_sharding: str | None) -> None:
        """Denoisers train under every launch: one process, DDP, FSDP and DeepSpeed."""

    def build_model(
        self, model_args, in_channels: int, resolution: int, num_classes: int = 0, text=None, num_frames=0
    ):
        """The `--model` preset (a UNet or a DiT, or their video versions for clips) for the data; for the
        shared-noise trainer, an image network for the frames of the clips."""
        if self.args.shared_noise:
            if not num_frames:
                raise UserError(
                    "--shared_noise trains an image network on the frames of clips, but the data are images"
                )
            if is_video_model(model_args.model):
                raise UserError(
                    f"--shared_noise trains an image network on frames, but --model {model_args.model} is a video "
                    "model; give an image model (unet_*, dit_*), or train the video model without --shared_noise"
                )
            num_frames = 0
        return build_model(model_args, in_channels, resolution, num_classes, text, num_frames, self.interval_embedding)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise (like x0) and times t in [0, 1] (B,) of a training batch x0, drawn from `generator`."""
        raise NotImplementedError

    def loss_and_estimate(self, model, x0, cond, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample loss (B,) in fp32 at the given noise and times, and the network's estimate of x0."""
        raise NotImplementedError

    def loss(self, model, x0: torch.Tensor, cond, generator: torch.Generator, noise=None) -> torch.Tensor:
        """Per-sample loss at noise and times drawn from `generator` (one per clip for the shared-noise trainer), or
        at the `noise` paired with x0 (reflow): the times are drawn as ever."""
        drawn, t = self.draw(x0[:, 0] if self.args.shared_noise else x0, generator)
        return self.loss_at(model, x0, cond, drawn if noise is None else noise, t)

    def refuses_pairs(self) -> str | None:
        return (
            f"a {self.name} model does not train on the straight lines between pairs; the reflow student is a flow "
            "model: train it with train_cfm.py"
        )

    def loss_at(self, model, x0, cond, noise, t) -> torch.Tensor:
        """The loss for given noise and times t in [0, 1] (B,): what validation evaluates on a fixed grid. The
        shared-noise trainer takes one noise frame per clip (a clip's first when the noise is shaped as x0)."""
        if self.args.shared_noise:
            return shared_noise_loss(self, model, x0, cond, noise, t, self.args.reg_weight)
        return self.loss_and_estimate(model, x0, cond, noise, t)[0]

    def run_sampler(self, sampler: str, fn, noise, steps: int, generators, callback) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, model, noise, cond=None, generators=None, **settings):
        """From pure noise to x0 (settings: sampler, num_inference_steps, guidance_scale, guidance_interval,
        guide_model, null_cond, callback).
        `generators`: one per sample, for samplers that draw noise on the way. The shared-noise trainer's image
        network makes clips (B, F, C, H, W) frame by frame, with shared noise (modules/objectives/frames.py)."""
        if self.args.shared_noise:
            frames = functools.partial(self.sample_images, model)
            return shared_noise_sample(frames, noise, cond, generators, **settings)
        return self.sample_images(model, noise, cond, generators=generators, **settings)

    def sample_images(
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
        guidance_interval=None,
        guide_model=None,
    ):
        """`sample` for the network as it is: its output shape is the noise's. `guidance_interval` ("LO,HI" or a
        pair; default as trained) and `guide_model` (autoguidance: a network that guides in place of the null
        condition) as samplers.guided_model takes them."""
        a = self.args
        scale = a.guidance_scale if guidance_scale is None else guidance_scale
        interval = parse_guidance_interval(a.guidance_interval if guidance_interval is None else guidance_interval)
        fn = guided_model(model, cond, scale, null_cond, interval, guide_model)
        sampler = sampler or a.sampler
        if problem := sampler_problem(sampler, self.name, self.samplers):
            raise UserError(f"--sampler {problem}")
        return self.run_sampler(sampler, fn, noise, num_inference_steps or a.num_inference_steps, generators, callback)

    def validation(self, model, x0: torch.Tensor, cond, seed: int, num_bins: int, noise=None) -> dict:
        """Loss on held-out x0 at fixed noise (the pairs' own, if given) and a fixed grid of t: overall, and per
        t-bin as val_loss_t<centre>."""
        result = validation_loss(model, self, x0, cond, seed, num_bins, noise=noise)
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
    model, objective, images: torch.Tensor, labels, seed: int, num_bins: int = 10, batch_size: int = 256, noise=None
) -> dict:
    """The objective's loss on held-out images at fixed times and fixed noise, so values compare across steps.

    Every image is evaluated at the centre of each of `num_bins` equal t-bins, t_j = (j + 1/2) / num_bins, with noise
    seeded by (seed, bin), or with its own `noise` in every bin (held-out reflow pairs). Returns {"val_loss": mean,
    "val_loss_bins": [mean per bin], "val_t": [t_j]}.
    """
    device = next(model.parameters()).device
    t_grid = [(j + 0.5) / num_bins for j in range(num_bins)]
    per_bin = torch.zeros(num_bins, dtype=torch.float64)
    for j, t in enumerate(t_grid):
        all_noise = noise
        if noise is None:
            all_noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + j))
        for first in range(0, len(images), batch_size):
            x0 = images[first : first + batch_size].to(device)
            batch_noise = all_noise[first : first + len(x0)].to(device)
            cond = None
            if labels is not None:  # class labels, or a text condition (modules/networks/conditioning.py)
                cond = select_condition(labels, slice(first, first + len(x0)))
                cond = {k: v.to(device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(device)
            t_batch = torch.full((len(x0),), t, device=device)
            per_bin[j] += objective.loss_at(model, x0, cond, batch_noise, t_batch).double().sum().cpu()
    per_bin /= len(images)
    return {"val_loss": per_bin.mean().item(), "val_loss_bins": per_bin.tolist(), "val_t": t_grid}
