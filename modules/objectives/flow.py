"""Flow matching (CFM / rectified flow), one convention throughout:

x_t = (1 - t) * x0 + t * noise,    t in [0, 1],  t = 0 is data, t = 1 is noise,
the network predicts the velocity  v = dx_t/dt = noise - x0,
and sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

import torch

from modules.config import FlowArguments
from modules.objectives.denoising import DenoisingObjective
from modules.objectives.samplers import FLOW_SAMPLERS


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t of shape (B,) broadcast over the other dims."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def flow_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The conditional velocity d x_t / dt = noise - x0."""
    return noise - x0


def sample_time(n: int, generator: torch.Generator, kind: str = "uniform", mean: float = 0.0, std: float = 1.0):
    """Training times in (0, 1): uniform, or logit-normal t = sigmoid(mean + std * z) (SD3's choice)."""
    device = generator.device
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown time sampling '{kind}'")


def ot_pair(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Reorder `noise` to minimise sum ||x0_i - noise_i||^2 over the minibatch (exact assignment, OT-CFM).

    Only the noise moves, so data and its labels stay together. On the meta device (FLOP counting) it is left as is:
    a permutation costs no FLOPs, and there are no values to pair."""
    from scipy.optimize import linear_sum_assignment

    if noise.is_meta:
        return noise

    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).pow(2)  # (B, B)
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


class FlowObjective(DenoisingObjective):
    """Conditional flow matching loss and its samplers."""

    name = "flow"
    samplers = tuple(FLOW_SAMPLERS)

    def __init__(self, args: FlowArguments):
        super().__init__(args)

    def draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise like x0 (paired with x0 by minibatch OT with --ot_coupling) and times from --time_sampling."""
        a = self.args
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
        t = sample_time(x0.shape[0], generator, a.time_sampling, a.logit_mean, a.logit_std).to(x0)
        if a.ot_coupling:
            noise = ot_pair(x0, noise)
        return noise, t

    def refuses_pairs(self) -> str | None:
        """A flow model trains on pairs (2-rectified flow: the straight lines from each pair's noise to its sample),
        unless --ot_coupling would pair each x0 with other noise."""
        if self.args.ot_coupling:
            return "--ot_coupling pairs each x0 with other noise, which breaks the pairs; train without it"
        return None

    def loss_and_estimate(self, model, x0, cond, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mean squared error between predicted and conditional velocity, in fp32, and the x0 estimate
        x_t - t v."""
        x_t = flow_interpolate(x0, noise, t)
        v = model(x_t, t, cond)
        loss = (v.float() - flow_velocity(x0, noise).float()).pow(2).flatten(1).mean(1)
        return loss, x_t - t.view(-1, *([1] * (x0.ndim - 1))) * v

    def run_sampler(self, sampler, fn, noise, steps, generators, callback):
        """Integrate from t = 1 (noise) to t = 0."""
        return FLOW_SAMPLERS[sampler](fn, noise, steps, generators=generators, callback=callback)
