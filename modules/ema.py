"""Exponential moving average of a model's parameters, with warm-up.

decay(step) = min(max_decay, 1 - (1 + step) ** -power): early averages forget fast, so a short run's EMA is not
dominated by its random initialisation (power 3/4 suits short runs, 2/3 long ones).
"""

from __future__ import annotations

import copy

import torch


def ema_decay(step: int, max_decay: float, power: float) -> float:
    """The EMA decay after `step` optimizer steps (0 at step 0: the first update copies the model)."""
    if step <= 0:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


class EMA:
    """Holds `model`'s EMA as a full copy, ready to sample from. Buffers are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, max_decay: float = 0.9999, power: float = 0.75):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA max decay must be in [0, 1), got {max_decay}")
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.max_decay, self.power, self.step = max_decay, power, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.step += 1
        decay = ema_decay(self.step, self.max_decay, self.power)
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the step travels in the checkpoint's JSON."""
        return {k: v.contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], step: int):
        self.model.load_state_dict(state)
        self.step = step
