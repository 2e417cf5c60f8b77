"""Exponential moving average of a model's parameters, with warm-up.

decay(step) = min(max_decay, 1 - (1 + step) ** -power): early averages forget fast, so a short run's EMA is not
dominated by its random initialisation (power 3/4 suits short runs, 2/3 long ones).

With `std`, it is instead a power-function EMA of that relative width (EDM2's post-hoc EMA profiles, kept for
`--ema_phema_stds`: modules/artifacts/phema.py): decay(step) = (1 - 1/step)^(exponent + 1).

Under FSDP the EMA is sharded like the model: each process averages only its own shard of every parameter, and
`gather()` (a collective) assembles the full EMA in the main process's copy, which is the only full one, when it is
needed to sample or save.
"""

from __future__ import annotations

import copy

import torch

from modules.artifacts.phema import power_decay, std_to_exponent


def ema_decay(step: int, max_decay: float, power: float) -> float:
    """The EMA decay after `step` optimizer steps (0 at step 0: the first update copies the model)."""
    if step <= 0:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


class EMA:
    """`model`'s EMA. `self.model` is a full copy, ready to sample from (None on processes told not to keep one);
    buffers are copied, not averaged."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_decay: float = 0.9999,
        power: float = 0.75,
        keep_copy: bool = True,
        std: float | None = None,
    ):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA max decay must be in [0, 1), got {max_decay}")
        self.std, self.exponent = std, None if std is None else float(std_to_exponent(std))
        self.model = copy.deepcopy(model).requires_grad_(False).eval() if keep_copy else None
        self.device = next(model.parameters()).device
        self.max_decay, self.power, self.step = max_decay, power, 0
        self.shards: dict[str, tuple[torch.Tensor, tuple]] | None = None  # name -> (local shard, _layout)
        self._gathered_step = 0

    def shard_like(self, model: torch.nn.Module):
        """From now on average this process's shards of `model`'s sharded (DTensor) parameters, FSDP2's, instead of
        the full copy; `model` holds the same weights as the one the EMA was made from."""
        self.shards = {}
        for name, p in model.named_parameters():
            if not hasattr(p, "to_local"):
                raise ValueError(f"EMA.shard_like: parameter {name} is not sharded (not a DTensor)")
            self.shards[name] = (p.detach().to_local().clone(), _layout(p))
        self.device = next(iter(self.shards.values()))[0].device

    def decay(self, step: int) -> float:
        if self.exponent is not None:
            return power_decay(step, self.exponent)
        return ema_decay(step, self.max_decay, self.power)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.step += 1
        weight = 1.0 - self.decay(self.step)
        if self.shards is not None:
            named = dict(model.named_parameters())
            ema_params = [local for local, _ in self.shards.values()]
            params = [named[name].detach().to_local().to(local.dtype) for name, (local, _) in self.shards.items()]
        else:
            ema_params = list(self.model.parameters())
            params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, weight)
        if self.model is not None:
            for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
                b_ema.copy_(b)

    @torch.no_grad()
    def gather(self):
        """Sharded: fill the main process's full copy from every process's shards. Every process must call it (it
        communicates), at the same steps; it does nothing when the copy is current, or when the EMA is not sharded."""
        if self.shards is None or self._gathered_step == self.step:
            return
        from torch.distributed.tensor import DTensor

        target = dict(self.model.named_parameters()) if self.model is not None else {}
        for name, (local, (mesh, placements, shape, stride)) in self.shards.items():
            full = DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
            full = full.full_tensor()
            if target:
                target[name].copy_(full)
        self._gathered_step = self.step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the step travels in the checkpoint's JSON. Sharded: after gather()."""
        if self.shards is not None and self._gathered_step != self.step:
            raise RuntimeError("EMA.state_dict of a sharded EMA needs gather() on every process first")
        return {k: v.contiguous() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], step: int):
        """Every process loads the full state (as saved by the main process); sharded, each keeps its own part."""
        if self.model is not None:
            self.model.load_state_dict(state)
        if self.shards is not None:
            from torch.distributed.tensor import distribute_tensor

            for name, (local, (mesh, placements, _, _)) in self.shards.items():
                full = state[name].to(device=local.device, dtype=local.dtype)
                local.copy_(distribute_tensor(full, mesh, placements, src_data_rank=None).to_local())
        self.step = self._gathered_step = step


def _layout(p) -> tuple:
    """What rebuilds a DTensor from its local shard: device mesh, placements, global shape and stride."""
    return p.device_mesh, p.placements, p.shape, p.stride()
