"""The shared-noise frame trainer: an image network learns clips by denoising their frames as one batch, where
every frame of a clip gets the same noise sample and the same t (`--shared_noise`). With equal noise, the frames
differ at every t only where the data differ, so the network's estimates of consecutive frames stay close together.

The loss is the objective's own loss over the frames, plus `--reg_weight` times a temporal-consistency term,

    mean_f || (x0_hat[f+1] - x0_hat[f]) - (x0[f+1] - x0[f]) ||^2,

the squared difference between the x0 estimates of consecutive frames, minus the same difference in the data.
Sampling starts every frame of a clip from one noise sample and gives every frame a copy of the clip's generator,
so they share every random draw as well (the stochastic samplers' noise). Clips are (B, F, C, H, W); the image
network sees (B * F, C, H, W), the frames of a clip next to each other.
"""

from __future__ import annotations

import torch

from modules.networks.conditioning import repeat_condition


def shared_noise_loss(objective, model, x0: torch.Tensor, cond, noise: torch.Tensor, t: torch.Tensor, weight: float):
    """Per-clip loss (B,) of clips x0 (B, F, C, H, W) with one `noise` (B, C, H, W) and time `t` (B,) per clip;
    noise shaped like the clips is taken from their first frames. `objective.loss_and_estimate` gives the loss of
    each frame and its x0 estimate."""
    b, f = x0.shape[:2]
    if noise.ndim == x0.ndim:
        noise = noise[:, 0]
    frames = x0.flatten(0, 1)
    loss, estimate = objective.loss_and_estimate(
        model, frames, repeat_condition(cond, f), noise.repeat_interleave(f, 0), t.repeat_interleave(f, 0)
    )
    loss = loss.view(b, f).mean(1)
    if weight and f > 1:
        step = estimate.view(x0.shape).float().diff(dim=1) - x0.float().diff(dim=1)
        loss = loss + weight * step.pow(2).flatten(1).mean(1)
    return loss


def copy_generator(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state as `generator`: it draws the same numbers."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def shared_noise_sample(sample_frames, noise: torch.Tensor, cond, generators, **settings) -> torch.Tensor:
    """Clips (B, F, C, H, W) from `noise` of that shape with an image sampler `sample_frames(noise, cond,
    generators=..., **settings)`: every frame starts from its clip's first noise frame and draws from a copy of its
    clip's generator."""
    b, f = noise.shape[:2]
    start = noise[:, :1].expand(noise.shape).flatten(0, 1)
    if generators is not None:
        generators = [copy_generator(g) for g in generators for _ in range(f)]
    null = settings.get("null_cond")
    if null is not None and len(next(iter(null.values()))) > 1:  # a text model's null condition, one per clip
        settings["null_cond"] = repeat_condition(null, f)
    frames = sample_frames(start, repeat_condition(cond, f), generators=generators, **settings)
    return frames.view(noise.shape)
