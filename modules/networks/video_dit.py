"""Space-time Diffusion Transformer for clips: the image DiT (dit.py) with patches over (time, height, width).

x (B, F, C, H, W) is cut into tp x p x p patches (`temporal_patch_size` frames, `patch_size` pixels square), each
a token of width D, T = F / tp tokens along time and S = (H / p) (W / p) per time step, N = T S in (t, row, col)
order. The conditioning (time, class or text), adaLN-Zero or adaLN-single, the final layer and the zero start are
the image DiT's. `video_attention` chooses what a block's self-attention sees:

- "full": every token attends to all N tokens; the blocks are the image DiT's own blocks.
- "factorized" (Latte's variant with spatial and temporal attention in each block): a block attends within each
  frame (S tokens, for every time step), then across time (T tokens, for every spatial location), then runs the
  MLP. Each of the three branches has its own shift, scale and gate, nine modulations per block instead of six,
  so each starts as the identity on its own and the time branch can open apart from the space branch. Attention
  costs O(N (S + T)) instead of O(N^2).

Positions: `pos_embed="absolute"` adds a fixed 3-D sin-cos embedding, its channels split as CogVideoX does (the
first D/4 encode the time step, the next 3D/8 the row, the last 3D/8 the column). `pos_embed="rope"` rotates q and
k by 3-D RoPE angles, the head's channel pairs split the same way (head_dim/8 pairs for time, 3 head_dim/16 each
for row and column). RoPE scores depend only on relative positions, so the factorized blocks use the angles of
(0, row, col) within a frame and those of (t, 0, 0) across time: the same scores as the 3-D angles of each token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from modules.networks.conditioning import ConditionEmbedder, check_text_config, own_text_encoder
from modules.networks.dit import (
    ADALN,
    Attention,
    DiTBlock,
    DiTTrunk,
    FinalLayer,
    grid_positions,
    modulate,
    preset,
    rope_angles,
    sincos_1d,
)

VIDEO_ATTENTION = ("factorized", "full")
POS_EMBED = ("absolute", "rope")


def sincos_3d_pos_embed(dim: int, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 3-D position embedding of a (grid_t, grid_h, grid_w) grid in (t, row, col) order: D/4 channels
    encode the time step, 3D/8 the row and 3D/8 the column (CogVideoX's split). (N, dim); dim % 16 == 0."""
    t, rows, cols = grid_positions(grid_t, grid_h, grid_w)
    space = 3 * dim // 8
    return torch.cat([sincos_1d(dim - 2 * space, t), sincos_1d(space, rows), sincos_1d(space, cols)], dim=1)


def rope_3d_angles(head_dim: int, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Rotation angles for 3-D RoPE of a (grid_t, grid_h, grid_w) grid: head_dim/8 channel pairs rotate with the
    time step, then 3 head_dim/16 with the row and as many with the column. (N, head_dim / 2); head_dim % 16 == 0."""
    space = 3 * head_dim // 16
    return rope_angles(grid_positions(grid_t, grid_h, grid_w), (head_dim // 2 - 2 * space, space, space))


class FactorizedBlock(DiTBlock):
    """Attention within each frame, then across time at each spatial location, [cross-attention,] then the MLP;
    each of the three branches with a shift, scale and gate of its own (nine modulations)."""

    num_modulations = 9  # shift, scale and gate of the space attention, of the time attention, then of the MLP
    gates = (2, 5, 8)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, mlp: str, text_dim: int, adaln: str):
        super().__init__(dim, num_heads, mlp_ratio, qk_norm, mlp, text_dim, adaln)
        self.temporal_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.temporal_attn = Attention(dim, num_heads, qk_norm)

    def space_attention(self, x: torch.Tensor, rope, frames: int) -> torch.Tensor:
        """Self-attention among the tokens of each time step: (B, N, D) -> (B, N, D), N = frames * S."""
        B, N, D = x.shape
        h = self.attn(x.reshape(B * frames, N // frames, D), rope)  # (B T, S, D)
        return h.reshape(B, N, D)

    def time_attention(self, x: torch.Tensor, rope, frames: int) -> torch.Tensor:
        """Self-attention among the tokens of each spatial location: (B, N, D) -> (B, N, D), N = frames * S."""
        B, N, D = x.shape
        h = x.reshape(B, frames, N // frames, D).transpose(1, 2).reshape(-1, frames, D)  # (B S, T, D)
        h = self.temporal_attn(h, rope)  # (B S, T, D)
        return h.reshape(B, N // frames, frames, D).transpose(1, 2).reshape(B, N, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope, context, frames: int) -> torch.Tensor:
        """x (B, N, D) in (t, row, col) order with `frames` time steps; rope: None, or the (cos, sin) of space and
        of time; c as DiTBlock takes it, with nine modulations under adaLN-single."""
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_m, scale_m, gate_m = self.modulations(c)
        space_rope, time_rope = rope if rope is not None else (None, None)
        h = modulate(self.norm1(x), shift_s, scale_s)
        x = x + gate_s[:, None] * self.space_attention(h, space_rope, frames)
        h = modulate(self.temporal_norm(x), shift_t, scale_t)
        x = x + gate_t[:, None] * self.time_attention(h, time_rope, frames)
        if self.cross_attn is not None:
            x = self.cross_attn(x, *context)
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class VideoDiTModel(DiTTrunk, ModelMixin, ConfigMixin):
    """Space-time DiT. `forward(x, t, cond)` maps clips (B, F, in_channels, H, W) to (B, F, out_channels, H, W).

    F must be a multiple of `temporal_patch_size`, H and W of `patch_size`. Clips of another length or size than
    (`num_frames`, `sample_size`) work too: their positions are computed on the fly. t and cond are the image
    DiT's: `num_classes` = 0 builds an unconditional model, otherwise label `num_classes` is the null class of
    classifier-free guidance; text conditioning as in DiTModel."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock", "FactorizedBlock"]
    _repeated_blocks = ["DiTBlock", "FactorizedBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        sample_size: int = 32,
        num_frames: int = 16,
        patch_size: int = 2,
        temporal_patch_size: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        video_attention: str = "factorized",
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
        check_video_dit_config(self.config)
        self.gradient_checkpointing = False
        self.text_model = own_text_encoder(text_encoder)  # a trainable one; frozen encoders stay outside

        tp, p = temporal_patch_size, patch_size
        self.x_embedder = nn.Conv3d(in_channels, hidden_size, (tp, p, p), stride=(tp, p, p))
        pooled = pooled_dim if text_conditioning != "none" else 0
        self.cond_embed = ConditionEmbedder(
            hidden_size, num_classes, frequency_dim=256, pooled_dim=pooled, interval=interval_embedding
        )
        block_class = FactorizedBlock if video_attention == "factorized" else DiTBlock
        width = block_class.num_modulations * hidden_size
        # adaLN-single: the one MLP from c to the modulations of every block, run once per forward.
        self.adaLN_shared = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, width)) if adaln == "single" else None
        # Fixed functions of the grid: not saved, so checkpoints stay free of derived values.
        grid = (num_frames // tp, sample_size // p, sample_size // p)
        if pos_embed == "absolute":
            self.register_buffer("abs_pos_embed", sincos_3d_pos_embed(hidden_size, *grid)[None], persistent=False)
        else:
            angles = rope_3d_angles(hidden_size // num_heads, *grid)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        cross = text_dim if text_conditioning == "cross_attn" else 0
        self.blocks = nn.ModuleList(
            block_class(hidden_size, num_heads, mlp_ratio, qk_norm, mlp, cross, adaln) for _ in range(depth)
        )
        # One token's outputs are its tp x p x p patch: p * p * (tp * out_channels) values.
        self.final_layer = FinalLayer(hidden_size, patch_size, tp * out_channels, adaln)
        self.initialize_weights()

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.patch_size

    @property
    def temporal_downsample_factor(self) -> int:
        """The number of frames must be a multiple of this."""
        return self.config.temporal_patch_size

    def unpatchify(self, x: torch.Tensor, grid_t: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, N, p * p * tp * C) -> (B, grid_t * tp, C, grid_h * p, grid_w * p)."""
        p, tp, c = self.config.patch_size, self.config.temporal_patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid_t, grid_h, grid_w, p, p, tp, c)  # (B, T, h, w, p, p, tp, C)
        x = torch.einsum("nthwpqsc->ntschpwq", x)  # (B, T, tp, C, h, p, w, q)
        return x.reshape(x.shape[0], grid_t * tp, c, grid_h * p, grid_w * p)  # (B, F, C, H, W)

    def positions(self, grid_t: int, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor | None, object]:
        """(absolute embedding (1, N, D) or None, rope): rope is None, the (cos, sin) (N, head_dim/2) of every
        token (full attention), or those of space (S, .) and of time (T, .) (factorized attention)."""
        config = self.config
        default = (config.num_frames // config.temporal_patch_size,) + (config.sample_size // config.patch_size,) * 2
        if config.pos_embed == "absolute":
            pos = self.abs_pos_embed
            if (grid_t, grid_h, grid_w) != default:
                pos = sincos_3d_pos_embed(config.hidden_size, grid_t, grid_h, grid_w)[None].to(device)
            return pos, None
        cos, sin = self.rope_cos, self.rope_sin
        if (grid_t, grid_h, grid_w) != default:
            angles = rope_3d_angles(config.hidden_size // config.num_heads, grid_t, grid_h, grid_w).to(device)
            cos, sin = angles.cos(), angles.sin()
        if config.video_attention == "full":
            return None, (cos, sin)
        spatial = grid_h * grid_w  # tokens 0 .. S-1 are (0, row, col); every S-th token is (t, 0, 0)
        return None, ((cos[:spatial], sin[:spatial]), (cos[::spatial], sin[::spatial]))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, r=None) -> torch.Tensor:
        """x: (B, F, C, H, W); t: scalar or (B,) in [0, 1]; cond: (B,) class labels, None (null class), or for a
        text-conditional model a dict of text tokens, mask and pooled embedding (modules/conditioning.py); r: as
        DiTModel's."""
        p, tp = self.config.patch_size, self.config.temporal_patch_size
        if x.ndim != 5:
            raise ValueError(f"VideoDiTModel takes clips (B, F, C, H, W), got shape {tuple(x.shape)}.")
        if x.shape[1] % tp:
            raise ValueError(f"num_frames ({x.shape[1]}) is not divisible by temporal_patch_size ({tp}).")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"Input size {tuple(x.shape[-2:])} is not divisible by the DiT patch size {p}.")
        grid = (x.shape[1] // tp, x.shape[-2] // p, x.shape[-1] // p)
        h = self.x_embedder(x.transpose(1, 2))  # (B, D, T, h, w)
        h = h.flatten(2).transpose(1, 2).contiguous()  # (B, N, D), tokens in (t, row, col) order
        pos, rope = self.positions(*grid, h.device)
        if pos is not None:
            h = h + pos.to(h.dtype)
        c, block_c, context = self.condition(t, cond, x.shape[0], h.dtype, r)
        frames = (grid[0],) if self.config.video_attention == "factorized" else ()
        for block in self.blocks:
            h = self._run(block, h, block_c, rope, context, *frames)
        h = self.final_layer(h, c)  # (B, N, p * p * tp * C)
        return self.unpatchify(h, *grid)


def check_video_dit_config(config) -> None:
    """ValueError naming the setting that a VideoDiTModel cannot be built with."""
    check_text_config(config.text_conditioning, config.text_dim, config.pooled_dim)
    for name, value, allowed in (
        ("adaln", config.adaln, ADALN),
        ("video_attention", config.video_attention, VIDEO_ATTENTION),
        ("pos_embed", config.pos_embed, POS_EMBED),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size ({config.hidden_size}) must be divisible by num_heads ({config.num_heads}).")
    head_dim = config.hidden_size // config.num_heads
    if config.pos_embed == "rope" and head_dim % 16:
        raise ValueError(f"3-D RoPE needs hidden_size / num_heads divisible by 16, got {head_dim}.")
    if config.pos_embed == "absolute" and config.hidden_size % 16:
        raise ValueError(f"The 3-D sin-cos embedding needs hidden_size divisible by 16, got {config.hidden_size}.")
    if config.sample_size % config.patch_size:
        raise ValueError(f"sample_size ({config.sample_size}) must be divisible by patch_size ({config.patch_size}).")
    if config.num_frames % config.temporal_patch_size:
        raise ValueError(
            f"num_frames ({config.num_frames}) must be divisible by temporal_patch_size "
            f"({config.temporal_patch_size})."
        )


# Clips of 16 frames of the image presets' latents, one frame a patch in time.
VIDEO_DEFAULTS = dict(num_frames=16, temporal_patch_size=1)


def video_dit_tiny(**overrides) -> VideoDiTModel:
    return preset(VideoDiTModel, "tiny", overrides, **VIDEO_DEFAULTS)


def video_dit_s(**overrides) -> VideoDiTModel:
    return preset(VideoDiTModel, "s", overrides, **VIDEO_DEFAULTS)


def video_dit_b(**overrides) -> VideoDiTModel:
    return preset(VideoDiTModel, "b", overrides, **VIDEO_DEFAULTS)


VIDEO_DIT_PRESETS = {"video_dit_tiny": video_dit_tiny, "video_dit_s": video_dit_s, "video_dit_b": video_dit_b}
