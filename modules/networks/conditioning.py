"""Conditioning inputs shared by the UNet and the DiT: time embedding, class or text embedding, cross-attention,
and the dropout of conditions that classifier-free guidance trains with.

A condition is one of: None (unconditional, or the null class), class labels (B,) long, or text as a dict
{"tokens": (B, L, D_text), "mask": (B, L) bool, "pooled": (B, D_pooled)} from modules/text.py. With text, the
pooled embedding is added to the time embedding ("pooled") and, with "cross_attn", the tokens are also attended
to by cross-attention layers. The null text condition is the encoding of the empty caption.

Both models take t as a float in [0, 1]: DDPM passes its integer step divided by the number of train steps, flow
matching passes its interpolation time. The sinusoidal embedding rescales t by 1000 so both look like the integer
timesteps the frequencies were designed for.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.networks.text import OwnTextConfig, OwnTextEncoder

TEXT_CONDITIONING = ("none", "pooled", "cross_attn")


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


def is_text(cond) -> bool:
    return isinstance(cond, dict)


def check_text_config(text_conditioning: str, text_dim: int, pooled_dim: int) -> None:
    """A denoiser's text settings: pooled needs pooled_dim, cross_attn also text_dim."""
    if text_conditioning not in TEXT_CONDITIONING:
        raise ValueError(f"text_conditioning must be one of {TEXT_CONDITIONING}, got {text_conditioning!r}.")
    if text_conditioning != "none" and not (pooled_dim > 0 and (text_conditioning == "pooled" or text_dim > 0)):
        raise ValueError(f"text_conditioning={text_conditioning!r} needs pooled_dim (and text_dim for cross_attn).")


def own_text_encoder(record: dict | None):
    """The trainable text encoder a denoiser holds (so it trains, checkpoints and averages with it), or None."""
    if not record:
        return None

    if record.get("kind") != "own":
        raise ValueError(f"a denoiser holds only a trainable ('own') text encoder, got kind {record.get('kind')!r}")
    return OwnTextEncoder(OwnTextConfig(**record["config"]))  # no .to(): from_pretrained may build it on meta


def resolve_text(text_encoder, cond):
    """A text condition as token ids ({"input_ids", "input_mask"}, for a denoiser's own encoder) -> embeddings."""
    if not (is_text(cond) and "input_ids" in cond):
        return cond
    if text_encoder is None:
        raise ValueError("got token ids, but this model holds no text encoder; pass text embeddings")
    e = text_encoder.encode(cond["input_ids"], cond["input_mask"].bool())
    return {"tokens": e.tokens, "mask": e.mask, "pooled": e.pooled}


def cat_conditions(conds: list):
    """Concatenate conditions along the batch: label tensors, or text dicts key by key."""
    if is_text(conds[0]):
        return {k: _cat_padded([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat over dim 0, padding dim 1 (token length) with zeros where lengths differ."""
    if tensors[0].ndim >= 2 and len({t.shape[1] for t in tensors}) > 1:
        length = max(t.shape[1] for t in tensors)
        tensors = [F.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def select_condition(cond, index):
    """Rows `index` of a condition (labels or a text dict)."""
    if cond is None:
        return None
    return {k: v[index] for k, v in cond.items()} if is_text(cond) else cond[index]


def repeat_condition(cond, repeats: int):
    """Each row of a condition (labels or a text dict) `repeats` times in a row: one per frame of a clip."""
    if cond is None:
        return None
    if is_text(cond):
        return {k: v.repeat_interleave(repeats, 0) for k, v in cond.items()}
    return cond.repeat_interleave(repeats, 0)


class CrossAttention(nn.Module):
    """x + proj(Attn(q = LN(x), k, v = tokens)) over the text tokens, masked where the mask is False.

    x (B, N, D) or a feature map (B, D, H, W) attended position by position. The output projection starts at zero,
    so the layer starts as the identity."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        spatial = x.ndim == 4
        if spatial:
            B, C, H, W = x.shape
            x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        B, N, D = x.shape
        heads, d = self.num_heads, D // self.num_heads
        q = self.q(self.norm(x)).view(B, N, heads, d).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(tokens.to(x.dtype)).view(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])  # (B, h, N, d)
        out = x + self.proj(h.transpose(1, 2).reshape(B, N, D))
        return out.transpose(1, 2).reshape(B, C, H, W) if spatial else out


def _batch_times(t: torch.Tensor | float, batch_size: int, device, name: str) -> torch.Tensor:
    """A time argument as float32 (batch_size,) on `device`; a scalar is broadcast."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch_size},), got shape {tuple(t.shape)}.")
    return t


class IntervalEmbedder(TimestepEmbedder):
    """The length t - r of the interval an average velocity u(z, r, t) is taken over (MeanFlow,
    modules/objectives/meanflow.py) -> (B, dim), added to the time embedding. Its last layer starts at zero, so a
    new model's u(z, r, t) starts as its instantaneous velocity at t, whatever r."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__(dim, frequency_dim)
        self.zero_output()

    def zero_output(self) -> None:
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


class ConditionEmbedder(nn.Module):
    """The conditioning vector c = TimestepEmbedder(t) [+ LabelEmbedder(y) | + MLP(pooled text)] that both models
    modulate with.

    `num_classes` = 0 builds an unconditional embedder (no label table). For a class-conditional one, cond=None
    means the null class, i.e. the unconditional branch of classifier-free guidance. `pooled_dim` > 0 makes it
    text-conditional: cond is then a text dict (see the module docstring), never None. `interval` adds the embedding
    of t - r, for networks that predict the average velocity over [r, t] (MeanFlow); without r, r = t.
    """

    def __init__(
        self, dim: int, num_classes: int = 0, frequency_dim: int = 256, pooled_dim: int = 0, interval: bool = False
    ):
        super().__init__()
        self.time = TimestepEmbedder(dim, frequency_dim)
        self.label = LabelEmbedder(num_classes, dim) if num_classes > 0 else None
        self.text = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if pooled_dim else None
        self.interval = IntervalEmbedder(dim, frequency_dim) if interval else None

    def forward(self, t: torch.Tensor | float, cond, batch_size: int, r: torch.Tensor | float | None = None):
        device = self.time.mlp[0].weight.device
        t = _batch_times(t, batch_size, device, "t")
        c = self.time(t)
        if self.interval is not None:
            c = c + self.interval(t - (t if r is None else _batch_times(r, batch_size, device, "r")))
        elif r is not None:
            raise ValueError(
                "This model predicts instantaneous velocities (interval_embedding=False); it takes no start time r."
            )
        if self.text is not None:
            if not is_text(cond) or cond["pooled"].shape[0] != batch_size:
                raise ValueError(
                    "This model is text-conditional: cond must be a dict with 'tokens', 'mask' and 'pooled' for "
                    f"{batch_size} samples (the null condition is the empty caption's encoding)."
                )
            return c + self.text(cond["pooled"].to(c.dtype))
        if is_text(cond):
            raise ValueError("This model is not text-conditional but got a text condition.")
        if self.label is None:
            if cond is not None:
                raise ValueError("This model is unconditional (num_classes=0) but got class labels; pass cond=None.")
            return c
        if cond is None:
            cond = torch.full((batch_size,), self.label.null_label, dtype=torch.long, device=device)
        if cond.shape != (batch_size,):
            raise ValueError(f"cond must be class labels of shape ({batch_size},), got shape {tuple(cond.shape)}.")
        return c + self.label(cond)
