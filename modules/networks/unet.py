"""ADM-style UNet (Ho et al. 2020; Dhariwal & Nichol 2021) taking (x, t, cond) with t in [0, 1].

Layout for channel_mult = (1, 2, 2) and num_res_blocks = 2, at 32x32:

    conv_in -> [Res, Res, Down] 32 -> [Res, Res, Down] 16 -> [Res, Res] 8 -> mid (Res, Attn, Res) 8
            -> [Res x 3, Up] 8 -> [Res x 3, Up] 16 -> [Res x 3] 32 -> GroupNorm-SiLU-conv_out

Every down-path output is kept as a skip and concatenated to one up-path ResBlock input. An attention block follows
each ResBlock whose feature map size is in `attention_resolutions`, and with text_conditioning="cross_attn" a
cross-attention to the text tokens after each attention block. The conditioning vector c (time + class or pooled
text) enters
every ResBlock as a scale and shift after its second GroupNorm. The last conv of every residual branch and the output
conv start at zero, so each block starts as the identity and the network's output starts at zero.
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


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups but at least 4 channels per group: small models still get stable statistics."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))); h = GN(h) * (1 + scale(c)) + shift(c); out = skip(x) + conv2(dropout(SiLU(h)))."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb arrives already through SiLU (done once in UNetModel.forward, not in every block).
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, heads of `num_head_channels` channels."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels and channels > num_head_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of num_head_channels ({num_head_channels}).")
        self.num_heads = max(1, channels // num_head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)  # (B, 3, h, d, HW)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)  # 3 x (B, h, HW, d), as the fused kernels want
        h = F.scaled_dot_product_attention(q, k, v)  # (B, h, HW, d)
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FrameLayer(nn.Module):
    """A layer across the frames of a clip: forward(x, num_frames) with x (B * F, C, H, W), each clip's F frames
    consecutive. The image UNet has none; the video UNet (networks/video_unet.py) adds its temporal layers as these."""


class EmbedSequential(nn.Sequential):
    """A run of layers between two skip connections; ResBlocks also get the conditioning vector, cross-attention
    layers the text tokens and mask, frame layers the number of frames per clip."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None, num_frames: int = 1) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CrossAttention):
                x = layer(x, *context)
            elif isinstance(layer, FrameLayer):
                x = layer(x, num_frames)
            else:
                x = layer(x)
        return x


class UNetModel(ModelMixin, ConfigMixin):
    """ADM-style UNet. `forward(x, t, cond)` maps (B, in_channels, H, W) to (B, out_channels, H, W).

    H and W must be multiples of `downsample_factor`; `sample_size` only decides at which levels the attention
    blocks sit (a level's feature map size is sample_size / 2^level; sizes no level has add no attention, the
    middle block attends always). `num_classes` = 0 builds an unconditional
    model; otherwise label `num_classes` is the null class used for classifier-free guidance.
    """

    _supports_gradient_checkpointing = True
    # The unit FSDP wraps (accelerate reads _no_split_modules); the same unit gradient checkpointing recomputes.
    _no_split_modules = ["EmbedSequential"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_size: int = 32,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        num_classes: int = 0,
        text_conditioning: str = "none",
        text_dim: int = 0,
        pooled_dim: int = 0,
        text_encoder: dict | None = None,
        interval_embedding: bool = False,
    ):
        super().__init__()
        if out_channels is None:
            out_channels = in_channels
            self.register_to_config(out_channels=out_channels)
        check_text_config(text_conditioning, text_dim, pooled_dim)
        if sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"sample_size ({sample_size}) must be divisible by 2^(len(channel_mult) - 1) = "
                f"{2 ** (len(channel_mult) - 1)} for channel_mult={tuple(channel_mult)}."
            )
        self.gradient_checkpointing = False
        self.text_model = own_text_encoder(text_encoder)  # a trainable one; frozen encoders stay outside
        emb_dim = 4 * base_channels
        pooled = pooled_dim if text_conditioning != "none" else 0
        embedder = dict(frequency_dim=base_channels, pooled_dim=pooled, interval=interval_embedding)
        self.cond_embed = ConditionEmbedder(emb_dim, num_classes, **embedder)

        def attention(ch: int) -> list[nn.Module]:
            layers = [AttentionBlock(ch, num_head_channels)]
            if text_conditioning == "cross_attn":
                layers.append(CrossAttention(ch, text_dim, max(1, ch // num_head_channels)))
            return layers

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        ch, resolution = base_channels, sample_size
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers += attention(ch)
                self.down_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2

        self.mid_block = EmbedSequential(
            ResBlock(ch, ch, emb_dim, dropout),
            *attention(ch),
            ResBlock(ch, ch, emb_dim, dropout),
        )

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            # One more ResBlock per level than on the way down: it takes the skip saved after the Downsample.
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers += attention(ch)
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.up_blocks.append(EmbedSequential(*layers))

        self.norm_out = group_norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context, num_frames: int) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, emb, context, num_frames)
        return block(h, emb, context, num_frames)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, r=None) -> torch.Tensor:
        """x: (B, C, H, W); t: scalar or (B,) in [0, 1]; cond: (B,) class labels, None (null class), or for a
        text-conditional model a dict of text tokens, mask and pooled embedding (modules/conditioning.py); r: the
        start time of an average velocity, for a model built with `interval_embedding` (None: r = t)."""
        self.check_input_size(x)
        emb, context = self.embed_condition(t, cond, x.shape[0], x.dtype, r)
        return self.apply_blocks(x, emb, context)

    def check_input_size(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"Input size {tuple(x.shape[-2:])} is not divisible by the UNet's downsample factor {f}; "
                f"use a resolution that is a multiple of {f} or fewer channel_mult levels."
            )

    def embed_condition(self, t: torch.Tensor | float, cond, batch_size: int, dtype: torch.dtype, r=None):
        """(emb, context): the conditioning vector every ResBlock gets, (B, 4 * base_channels), through SiLU once
        here rather than in every block; the text tokens and mask cross-attention attends to, or None."""
        cond = resolve_text(self.text_model, cond)
        emb = F.silu(self.cond_embed(t, cond, batch_size, r)).to(dtype)
        context = (cond["tokens"], cond["mask"]) if self.config.text_conditioning == "cross_attn" else None
        return emb, context

    def apply_blocks(self, x: torch.Tensor, emb: torch.Tensor, context, num_frames: int = 1) -> torch.Tensor:
        """conv_in, the down, middle and up blocks and conv_out on x (N, C, H, W) conditioned by emb (N, D); for
        clips N = B * F with each clip's frames consecutive, and `num_frames` F goes to the frame layers."""
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, emb, context, num_frames)
            skips.append(h)
        h = self._run(self.mid_block, h, emb, context, num_frames)
        for block in self.up_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return self.conv_out(F.silu(self.norm_out(h)))


# The presets' configurations; the video UNet's presets (networks/video_unet.py) are these with temporal layers.
UNET_CONFIGS = {
    "unet_s": dict(
        in_channels=3,
        sample_size=32,
        base_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_head_channels=64,
        dropout=0.0,
    ),
    "unet_m": dict(
        in_channels=3,
        sample_size=32,
        base_channels=64,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        num_head_channels=64,
        dropout=0.1,
    ),
    "unet_l": dict(
        in_channels=3,
        sample_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_head_channels=64,
        dropout=0.1,
    ),
}


def unet_s(**overrides) -> UNetModel:
    """Small UNet for 32x32 data on a CPU (Fashion-MNIST's main job): 3 levels of 16/32/64 channels, so the
    full-resolution level, where most of the compute goes, stays thin; attention at 8x8."""
    return UNetModel(**{**UNET_CONFIGS["unet_s"], **overrides})


def unet_m(**overrides) -> UNetModel:
    """Medium UNet: 4 levels, attention at 16x16 and 8x8."""
    return UNetModel(**{**UNET_CONFIGS["unet_m"], **overrides})


def unet_l(**overrides) -> UNetModel:
    """The DDPM paper's CIFAR-10 network (35.7M parameters there; scale-shift conditioning adds ~2M here)."""
    return UNetModel(**{**UNET_CONFIGS["unet_l"], **overrides})


UNET_PRESETS = {"unet_s": unet_s, "unet_m": unet_m, "unet_l": unet_l}
