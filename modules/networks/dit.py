"""Diffusion Transformer (Peebles & Xie 2023) taking (x, t, cond) with t in [0, 1].

x (B, C, H, W) is cut into p x p patches, each a token of width D; a stack of transformer blocks modulated by the
conditioning vector c = time embedding [+ class embedding] through adaLN-Zero:

    h = h + gate_msa(c) * Attn(LN(h) * (1 + scale_msa(c)) + shift_msa(c))
    h = h + gate_mlp(c) * MLP(LN(h) * (1 + scale_mlp(c)) + shift_mlp(c))

where block i computes its six modulations S(i) = Linear_i(SiLU(c)) with a (D, 6D) linear of its own. With
adaln="single" (adaLN-single, PixArt-alpha section 2.3) one shared linear computes S = Linear(SiLU(c)) once per
forward and block i adds a learned table E(i) of shape (6, D): S(i) = S + E(i); the final layer's shift and scale
are c + E_final, E_final (2, D). That replaces depth + 1 linears of 6D^2 (2D^2) weights by one, about a third of
DiT-XL/2's parameters.

With text_conditioning="cross_attn", each block also attends to the text tokens between the two (PixArt-alpha):
h = h + CrossAttn(LN(h), tokens); the pooled text embedding joins c in both text modes. Then a final adaLN layer
and a linear map back to p * p * out_channels values per token, unpatchified. The gates and the final linear
start at zero, so every block starts as the identity and the output starts at zero.

Options beyond the paper: 2-D RoPE on q and k instead of the absolute sin-cos position embedding, RMSNorm on
per-head q and k (QK-norm), and a SwiGLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from modules.networks.conditioning import (
    ConditionEmbedder,
    CrossAttention,
    check_text_config,
    own_text_encoder,
    resolve_text,
)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-i / (dim/2)), i < dim/2. pos (N,) -> (N, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = pos.double()[:, None] * omega  # (N, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()


def grid_positions(*sizes: int) -> tuple[torch.Tensor, ...]:
    """Index along each axis of each token of a grid, in row-major order: len(sizes) x (prod(sizes),). For a 2-D
    grid (grid_h, grid_w), the row and the column of each token."""
    return tuple(axis.reshape(-1) for axis in torch.meshgrid(*(torch.arange(n) for n in sizes), indexing="ij"))


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D position embedding: first half of the channels encodes the row, second half the column. (N, dim)."""
    rows, cols = grid_positions(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)


def rope_2d_angles(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles for 2-D RoPE: the first head_dim/4 channel pairs rotate with the row, the rest with the column.

    angle[n, i] = row_n * theta^(-i / (head_dim/4)) for i < head_dim/4, and likewise with col_n for the second
    half. Returns (N, head_dim / 2).
    """
    quarter = head_dim // 4
    return rope_angles(grid_positions(grid_h, grid_w), (quarter, quarter), theta)


def rope_angles(positions: tuple[torch.Tensor, ...], pairs: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles for RoPE over several axes: axis a rotates pairs[a] channel pairs of its own, in order.

    angle[n, i] = positions[a][n] * theta^(-i / pairs[a]) for i < pairs[a]. positions: one (N,) tensor per axis.
    Returns (N, sum(pairs)).
    """
    parts = []
    for pos, n in zip(positions, pairs, strict=True):
        inv_freq = 1.0 / theta ** (torch.arange(n, dtype=torch.float32) / n)
        parts.append(pos[:, None] * inv_freq)  # (N, n)
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x_2i, x_2i+1) of x (B, heads, N, d) by the angles behind cos, sin (N, d/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (B, heads, N, d/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, heads, N, d/2, 2)
    return out.flatten(-2).type_as(x)  # (B, heads, N, d)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, d)
        if self.qk_norm:
            # In the norm weight's dtype (float32 under autocast): the fused kernel needs input and weight alike.
            dtype = self.q_norm.weight.dtype
            q, k = self.q_norm(q.to(dtype)).type_as(v), self.k_norm(k.to(dtype)).type_as(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    """GELU (tanh) MLP with hidden = mlp_ratio * dim, or SwiGLU with hidden = 2/3 * mlp_ratio * dim (same params)."""

    def __init__(self, dim: int, mlp_ratio: float, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "gelu":
            hidden = int(dim * mlp_ratio)
            self.fc1 = nn.Linear(dim, hidden)
        elif kind == "swiglu":
            hidden = 8 * round(2 / 3 * mlp_ratio * dim / 8)  # multiple of 8 for efficient matmuls
            self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value in one matmul
        else:
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}.")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


ADALN = ("zero", "single")
GATES = (2, 5)  # rows of the six modulations that gate a branch: gate_msa, gate_mlp


class DiTBlock(nn.Module):
    """Self-attention [, cross-attention] and MLP, modulated by adaLN-Zero (a modulation MLP of its own) or
    adaLN-single (the shared modulations plus a learned table of its own)."""

    num_modulations = 6  # shift, scale and gate of the attention, then of the MLP
    gates = GATES

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        mlp: str,
        text_dim: int = 0,
        adaln: str = "zero",
        interval_embedding: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.cross_attn = CrossAttention(dim, text_dim, num_heads) if text_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, mlp)
        if adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.num_modulations * dim))
            self.scale_shift_table = None
        else:  # E(i) of PixArt-alpha: this block's offsets to the shared modulations (set in initialize_weights)
            self.scale_shift_table = nn.Parameter(torch.zeros(self.num_modulations, dim))

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """num_modulations x (B, D) from c: the conditioning vector (B, D) under adaLN-Zero, the shared modulations
        (B, num_modulations, D) under adaLN-single."""
        if self.scale_shift_table is None:
            return self.adaLN_modulation(c).chunk(self.num_modulations, dim=1)
        return (self.scale_shift_table.to(c.dtype) + c).unbind(1)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, context=None
    ) -> torch.Tensor:
        """c: the conditioning vector (B, D) under adaLN-Zero, the shared modulations (B, 6, D) under adaLN-single."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulations(c)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        if self.cross_attn is not None:
            x = self.cross_attn(x, *context)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map to p * p * out_channels per token. Its shift and scale come from an MLP of c
    (adaLN-Zero) or, under adaLN-single, from c plus a learned (2, D) table (PixArt-alpha's T2IFinalLayer)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaln: str = "zero"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
            self.scale_shift_table = None
        else:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.scale_shift_table is None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        else:
            shift, scale = (self.scale_shift_table.to(c.dtype) + c[:, None]).unbind(1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiTTrunk:
    """What the image and the video DiT share around their blocks: the weight initialisation, the conditioning of
    a forward and the block runner (gradient checkpointing). Expects x_embedder, cond_embed, adaLN_shared, blocks
    (with their `modulations` and `gates`), final_layer and text_model."""

    def initialize_weights(self) -> None:
        """Xavier-uniform linears, normal(0.02) embeddings; zero adaLN modulations and final layer (adaLN-Zero).

        Under adaLN-single the shared MLP starts at zero and each table at PixArt-alpha's normal(0, 1/D), except
        its gate rows, which start at zero: every gate is zero, so every block starts as the identity."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # The patch embedding is a linear map of each flattened patch.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.cond_embed.time.mlp[0].weight, std=0.02)
        nn.init.normal_(self.cond_embed.time.mlp[2].weight, std=0.02)
        if self.cond_embed.label is not None:
            nn.init.normal_(self.cond_embed.label.embedding.weight, std=0.02)
        if self.cond_embed.interval is not None:
            nn.init.normal_(self.cond_embed.interval.mlp[0].weight, std=0.02)
            self.cond_embed.interval.zero_output()
        for block in self.blocks:
            if block.scale_shift_table is None:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            else:
                nn.init.normal_(block.scale_shift_table, std=self.config.hidden_size**-0.5)
                with torch.no_grad():
                    block.scale_shift_table[list(block.gates)] = 0.0
            if block.cross_attn is not None:  # starts as the identity, like every other branch
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        if self.adaLN_shared is not None:
            nn.init.zeros_(self.adaLN_shared[-1].weight)
            nn.init.zeros_(self.adaLN_shared[-1].bias)
        if self.final_layer.scale_shift_table is None:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        else:
            nn.init.normal_(self.final_layer.scale_shift_table, std=self.config.hidden_size**-0.5)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.text_model is not None:  # its own initialisation, not the DiT's
            self.text_model.initialize_weights()

    def condition(self, t: torch.Tensor | float, cond, batch_size: int, dtype: torch.dtype, r=None):
        """(c, block_c, context): the conditioning vector c (B, D) of the final layer; what each block modulates
        with (c under adaLN-Zero, the shared modulations (B, num_modulations, D) under adaLN-single); and the text
        tokens and mask that cross-attention reads, or None."""
        cond = resolve_text(self.text_model, cond)
        c = self.cond_embed(t, cond, batch_size, r).to(dtype)  # (B, D)
        context = (cond["tokens"], cond["mask"]) if self.config.text_conditioning == "cross_attn" else None
        block_c = c if self.adaLN_shared is None else self.adaLN_shared(c).unflatten(1, (-1, c.shape[1]))
        return c, block_c, context

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


class DiTModel(DiTTrunk, ModelMixin, ConfigMixin):
    """DiT. `forward(x, t, cond)` maps (B, in_channels, H, W) to (B, out_channels, H, W).

    H and W must be multiples of `patch_size`. Inputs of another size than `sample_size` work too: the position
    embedding (or RoPE angles) for that grid is then computed on the fly. `num_classes` = 0 builds an
    unconditional model; otherwise label `num_classes` is the null class used for classifier-free guidance.
    """

    _supports_gradient_checkpointing = True
    # The unit FSDP wraps (accelerate reads _no_split_modules) and that regional torch.compile compiles once.
    _no_split_modules = ["DiTBlock"]
    _repeated_blocks = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        qk_norm: bool = False,
        pos_embed: str = "absolute",
        mlp: str = "gelu",
        text_conditioning: str = "none",
        text_dim: int = 0,
        pooled_dim: int = 0,
        text_encoder: dict | None = None,
        adaln: str = "zero",
        interval_embedding: bool = False,
    ):
        super().__init__()
        if out_channels is None:
            out_channels = in_channels
            self.register_to_config(out_channels=out_channels)
        check_text_config(text_conditioning, text_dim, pooled_dim)
        if adaln not in ADALN:
            raise ValueError(f"adaln must be one of {ADALN}, got {adaln!r}.")
        if pos_embed not in ("absolute", "rope"):
            raise ValueError(f"pos_embed must be 'absolute' or 'rope', got {pos_embed!r}.")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        head_dim = hidden_size // num_heads
        if pos_embed == "rope" and head_dim % 4:
            raise ValueError(f"2-D RoPE needs hidden_size / num_heads divisible by 4, got {head_dim}.")
        if pos_embed == "absolute" and hidden_size % 4:
            raise ValueError(f"The 2-D sin-cos embedding needs hidden_size divisible by 4, got {hidden_size}.")
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size}).")
        self.gradient_checkpointing = False
        self.text_model = own_text_encoder(text_encoder)  # a trainable one; frozen encoders stay outside

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        pooled = pooled_dim if text_conditioning != "none" else 0
        self.cond_embed = ConditionEmbedder(
            hidden_size, num_classes, frequency_dim=256, pooled_dim=pooled, interval=interval_embedding
        )
        # adaLN-single: the one MLP from c to the six modulations of every block, run once per forward.
        self.adaLN_shared = (
            nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if adaln == "single" else None
        )
        grid = sample_size // patch_size
        # Fixed functions of the grid: not saved, so checkpoints stay free of derived values.
        if pos_embed == "absolute":
            self.register_buffer("abs_pos_embed", sincos_2d_pos_embed(hidden_size, grid, grid)[None], persistent=False)
        else:
            angles = rope_2d_angles(head_dim, grid, grid)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        cross = text_dim if text_conditioning == "cross_attn" else 0
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, mlp, cross, adaln) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, adaln)
        self.initialize_weights()

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.patch_size

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, N, p * p * C) -> (B, C, grid_h * p, grid_w * p)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, r=None) -> torch.Tensor:
        """x: (B, C, H, W); t: scalar or (B,) in [0, 1]; cond: (B,) class labels, None (null class), or for a
        text-conditional model a dict of text tokens, mask and pooled embedding (modules/conditioning.py); r: the
        start time of an average velocity, for a model built with `interval_embedding` (None: r = t)."""
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} is not divisible by the DiT patch size {p}.")
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        grid = self.config.sample_size // p
        h = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D); contiguous: no copy per norm
        rope = None
        if self.config.pos_embed == "absolute":
            pos = self.abs_pos_embed
            if (grid_h, grid_w) != (grid, grid):
                pos = sincos_2d_pos_embed(h.shape[-1], grid_h, grid_w)[None].to(h.device)
            h = h + pos.to(h.dtype)
        else:
            cos, sin = self.rope_cos, self.rope_sin
            if (grid_h, grid_w) != (grid, grid):
                angles = rope_2d_angles(2 * cos.shape[-1], grid_h, grid_w).to(h.device)
                cos, sin = angles.cos(), angles.sin()
            rope = (cos, sin)
        c, block_c, context = self.condition(t, cond, x.shape[0], h.dtype, r)
        for block in self.blocks:
            h = self._run(block, h, block_c, rope, context)
        h = self.final_layer(h, c)  # (B, N, p * p * C)
        return self.unpatchify(h, grid_h, grid_w)


# (depth, hidden size, heads) of the DiT paper's sizes (and a tiny one); the video DiT's presets take them too.
DIT_SIZES = {"tiny": (6, 192, 3), "s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
# What a preset sets besides its size: 4x32x32 latents (256 px images through an 8x VAE), patch 2.
PRESET_DEFAULTS = dict(in_channels=4, sample_size=32, patch_size=2, mlp_ratio=4.0)


def preset(cls, size: str, overrides: dict, **defaults):
    """A `cls` of DiT size `size` with the preset defaults, then `defaults`, then `overrides`."""
    depth, hidden_size, num_heads = DIT_SIZES[size]
    sizes = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads)
    return cls(**{**PRESET_DEFAULTS, **defaults, **sizes, **overrides})


def dit_tiny(**overrides) -> DiTModel:
    return preset(DiTModel, "tiny", overrides)


def dit_s(**overrides) -> DiTModel:
    return preset(DiTModel, "s", overrides)


def dit_b(**overrides) -> DiTModel:
    return preset(DiTModel, "b", overrides)


def dit_l(**overrides) -> DiTModel:
    return preset(DiTModel, "l", overrides)


def dit_xl(**overrides) -> DiTModel:
    return preset(DiTModel, "xl", overrides)


DIT_PRESETS = {"dit_tiny": dit_tiny, "dit_s": dit_s, "dit_b": dit_b, "dit_l": dit_l, "dit_xl": dit_xl}
