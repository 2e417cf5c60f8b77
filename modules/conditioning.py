"""Conditioning inputs shared by the UNet and the DiT: time embedding, class embedding, CFG label dropout.

Both models take t as a float in [0, 1]: DDPM passes its integer step divided by the number of train steps, flow
matching passes its interpolation time. The sinusoidal embedding rescales t by 1000 so both look like the integer
timesteps the frequencies were designed for.
"""

import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor | float, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a continuous time t in [0, 1].

    With s = 1000 t, half = dim // 2 and frequencies w_i = max_period^(-i / half) for i = 0 .. half - 1:

        emb(t) = [cos(s w_0), ..., cos(s w_{half-1}), sin(s w_0), ..., sin(s w_{half-1})]

    (a zero column is appended when dim is odd). Computed in float32 whatever the dtype of t.

    Args:
        t: scalar or tensor of any shape, usually (B,).
        dim: embedding width.
        max_period: controls the lowest frequency.

    Returns:
        Tensor of shape (*t.shape, dim), float32.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t)[..., None] * freqs  # (*t.shape, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (frequency_dim) -> Linear -> SiLU -> Linear -> (B, dim)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class label -> (B, dim). Row `num_classes` is the null class that classifier-free guidance samples with."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)


def drop_labels(
    labels: torch.Tensor, drop_prob: float, null_label: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Replace each label by `null_label` independently with probability `drop_prob` (CFG training).

    One uniform number per label is always drawn from `generator` (on the generator's device), even when
    drop_prob is 0, so the generator advances the same way whatever drop_prob is and a run is reproducible
    from its seed.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}.")
    device = generator.device if generator is not None else labels.device
    u = torch.rand(labels.shape, generator=generator, device=device).to(labels.device)
    return torch.where(u < drop_prob, torch.full_like(labels, null_label), labels)


class ConditionEmbedder(nn.Module):
    """The conditioning vector c = TimestepEmbedder(t) [+ LabelEmbedder(y)] that both models modulate with.

    `num_classes` = 0 builds an unconditional embedder (no label table). For a class-conditional one, cond=None
    means the null class, i.e. the unconditional branch of classifier-free guidance.
    """

    def __init__(self, dim: int, num_classes: int = 0, frequency_dim: int = 256):
        super().__init__()
        self.time = TimestepEmbedder(dim, frequency_dim)
        self.label = LabelEmbedder(num_classes, dim) if num_classes > 0 else None

    def forward(self, t: torch.Tensor | float, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        device = self.time.mlp[0].weight.device
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must be a scalar or have shape ({batch_size},), got shape {tuple(t.shape)}.")
        c = self.time(t)
        if self.label is None:
            if cond is not None:
                raise ValueError("This model is unconditional (num_classes=0) but got class labels; pass cond=None.")
            return c
        if cond is None:
            cond = torch.full((batch_size,), self.label.null_label, dtype=torch.long, device=device)
        if cond.shape != (batch_size,):
            raise ValueError(f"cond must be class labels of shape ({batch_size},), got shape {tuple(cond.shape)}.")
        return c + self.label(cond)
