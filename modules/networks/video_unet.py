"""The UNet for clips: the image UNet (networks/unet.py) with temporal layers after its spatial blocks, as in Video
Diffusion Models (Ho et al. 2022) and AnimateDiff (Guo et al. 2023). forward(x, t, cond) maps clips
(B, F, C, H, W) to (B, F, out_channels, H, W), with one t and one condition per clip.

The spatial layers see each frame as an image: frames are folded into the batch, (B * F, C, H, W), and every frame
gets its clip's t and condition. After every block of the image UNet that holds a ResBlock (each level's
ResBlock + attention blocks, on the way down and up, and the middle block), a temporal block looks across the
frames at each spatial position, tokens (B * H * W, F, C):

    tokens = tokens + conv(SiLU(LN(tokens)))                   kernel 3 over the frames, with temporal_conv=True
    tokens = tokens + proj(Attn(LN(tokens) + P))               attention over the F frames, P sin-cos of the index

The convolution and the output projection start at zero, so every temporal block starts as the identity: an image
UNet's weights loaded into the spatial layers (`load_image_unet_weights`, or `VideoUNetModel.from_image_unet`) make a
video UNet that denoises each frame as the image UNet denoises it alone. The temporal blocks are named "temporal"
inside the image UNet's blocks, so every spatial parameter keeps the image UNet's state dict key.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

from modules.config import UserError
from modules.networks.dit import sincos_1d
from modules.networks.unet import (
    UNET_CONFIGS,
    EmbedSequential,
    FrameLayer,
    ResBlock,
    UNetModel,
    Upsample,
    zero_module,
)
from modules.networks.weights import kept_as_built, state_dict_mismatches

MAX_ATTENTION_BATCH = 65535  # spatial positions attended at once (each over its frames)


def frame_position_embedding(num_frames: int, dim: int) -> torch.Tensor:
    """The fixed sin-cos embedding of the frame index 0 .. F - 1 (a zero column when dim is odd): (F, dim)."""
    return F.pad(sincos_1d(dim - dim % 2, torch.arange(num_frames)), (0, dim % 2))


class TemporalAttention(nn.Module):
    """tokens + proj(Attn(LN(tokens) + P)) over the frames of each spatial position, heads of `num_head_channels`
    channels; tokens (N, F, C) with N = B * H * W. The output projection starts at zero."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels and channels > num_head_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of num_head_channels ({num_head_channels}).")
        self.num_heads = max(1, channels // num_head_channels)
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        N, frames, C = tokens.shape
        h = self.norm(tokens) + frame_position_embedding(frames, C).to(tokens)  # (N, F, C)
        qkv = self.qkv(h).view(N, frames, 3, self.num_heads, C // self.num_heads)  # (N, F, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, h, F, d)
        # Batches of at most MAX_ATTENTION_BATCH: CUDA's fused kernels fail on a batch dimension over 65535.
        rows = [slice(i, i + MAX_ATTENTION_BATCH) for i in range(0, N, MAX_ATTENTION_BATCH)]
        h = torch.cat([F.scaled_dot_product_attention(q[r], k[r], v[r]) for r in rows])  # (N, h, F, d)
        return tokens + self.proj(h.transpose(1, 2).reshape(N, frames, C))  # (N, F, C)


class TemporalConv(nn.Module):
    """tokens + conv(SiLU(LN(tokens))), a kernel-3 convolution over the frames of each spatial position, zero-padded
    at the clip's ends; tokens (N, F, C). The convolution starts at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.conv = zero_module(nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(tokens)).transpose(1, 2)  # (N, C, F)
        return tokens + self.conv(h).transpose(1, 2)  # (N, F, C)


class TemporalBlock(FrameLayer):
    """The temporal layers after one block of the image UNet: [TemporalConv], TemporalAttention, on the frames of
    each spatial position. Nothing here mixes positions or clips."""

    def __init__(self, channels: int, num_head_channels: int, temporal_conv: bool):
        super().__init__()
        self.conv = TemporalConv(channels) if temporal_conv else None
        self.attention = TemporalAttention(channels, num_head_channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BF, C, H, W = x.shape
        if BF % num_frames:
            raise ValueError(f"a batch of {BF} frames is not whole clips of {num_frames} frames")
        tokens = x.unflatten(0, (-1, num_frames)).permute(0, 3, 4, 1, 2).reshape(-1, num_frames, C)  # (B*H*W, F, C)
        if self.conv is not None:
            tokens = self.conv(tokens)
        tokens = self.attention(tokens)
        return tokens.unflatten(0, (-1, H, W)).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)  # (B*F, C, H, W)


def with_temporal_block(block: EmbedSequential, num_head_channels: int, temporal_conv: bool) -> EmbedSequential:
    """`block` with a TemporalBlock named "temporal" after its spatial layers, before its Upsample if it ends in one
    (so it works at its level's resolution). The other layers keep their names, hence their state dict keys."""
    layers = list(block.named_children())
    channels = [layer for _, layer in layers if isinstance(layer, ResBlock)][-1].conv2.out_channels
    at = len(layers) - isinstance(layers[-1][1], Upsample)
    temporal = TemporalBlock(channels, num_head_channels, temporal_conv)
    return EmbedSequential(OrderedDict([*layers[:at], ("temporal", temporal), *layers[at:]]))


class VideoUNetModel(UNetModel):
    """The image UNet with temporal blocks. `forward(x, t, cond)` maps (B, F, in_channels, H, W) to
    (B, F, out_channels, H, W); any number of frames. The settings are the image UNet's, plus `temporal_conv`: a
    temporal convolution before each temporal attention."""

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
        temporal_conv: bool = False,
        interval_embedding: bool = False,
    ):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            sample_size=sample_size,
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            num_head_channels=num_head_channels,
            dropout=dropout,
            num_classes=num_classes,
            text_conditioning=text_conditioning,
            text_dim=text_dim,
            pooled_dim=pooled_dim,
            text_encoder=text_encoder,
            interval_embedding=interval_embedding,
        )
        # Built after the spatial layers, so a seed gives the spatial layers the image UNet's initial weights.
        for blocks in (self.down_blocks, self.up_blocks):
            for i, block in enumerate(blocks):
                if any(isinstance(layer, ResBlock) for layer in block):  # not the Downsample blocks
                    blocks[i] = with_temporal_block(block, num_head_channels, temporal_conv)
        self.mid_block = with_temporal_block(self.mid_block, num_head_channels, temporal_conv)

    @classmethod
    def from_image_unet(cls, unet: UNetModel, temporal_conv: bool = False) -> VideoUNetModel:
        """A video UNet whose spatial layers are copies of `unet`'s; its temporal layers start as the identity."""
        if type(unet) is not UNetModel:
            raise TypeError(f"from_image_unet takes an image UNetModel, got a {type(unet).__name__}")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls(**config, temporal_conv=temporal_conv).to(unet.device)
        load_image_unet_weights(model, unet.state_dict(), dict(config), "the image UNet")
        return model

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, r=None) -> torch.Tensor:
        """x: clips (B, F, C, H, W); t: scalar or (B,) in [0, 1], one per clip; cond and r: as the image UNet's, one
        per clip (labels (B,), None, or text for B clips)."""
        if x.ndim != 5:
            raise ValueError(f"The video UNet takes clips of shape (B, F, C, H, W), got shape {tuple(x.shape)}.")
        B, num_frames = x.shape[:2]
        self.check_input_size(x)
        emb, context = self.embed_condition(t, cond, B, x.dtype, r)  # (B, D), once per clip
        # Every frame gets its clip's t and condition.
        emb = emb.repeat_interleave(num_frames, dim=0)  # (B*F, D)
        if context is not None:
            context = tuple(c.repeat_interleave(num_frames, dim=0) for c in context)  # (B*F, L, D_text), (B*F, L)
        h = self.apply_blocks(x.flatten(0, 1), emb, context, num_frames)  # (B*F, out_channels, H, W)
        return h.unflatten(0, (B, num_frames))  # (B, F, out_channels, H, W)


def temporal_parameter_names(model: VideoUNetModel) -> set[str]:
    """The state dict keys of the temporal blocks: all the video UNet has beyond the image UNet."""
    return {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, TemporalBlock)
        for key in module.state_dict()
    }


def load_image_unet_weights(model: VideoUNetModel, state: dict[str, torch.Tensor], image_config: dict, source: str):
    """Copy an image UNet's weights into a video UNet's spatial layers, leaving its temporal layers as they are (at
    init the identity, so each frame is then denoised as the image UNet denoises it alone): what `--init_from` an
    image UNet does. `state`: the image UNet's state dict; `image_config`: its config (config.json); `source` names it
    in the errors, which are `UserError`s naming the first parameters or the setting that differ."""
    kind = image_config.get("_class_name", "UNetModel")
    if kind != "UNetModel":
        raise UserError(f"{source} is a {kind}, but only an image UNet (UNetModel) loads into a video UNet")
    for key in ("num_head_channels", "text_encoder"):  # they change what the weights compute, not their shapes
        saved, own = (json.dumps(value, sort_keys=True) for value in (image_config.get(key), model.config[key]))
        if saved != own:
            raise UserError(f"{source} has {key} {saved}, but the video UNet has {own}; build it with the same {key}")
    own = model.state_dict()
    kept = temporal_parameter_names(model) | kept_as_built(own, model.config, image_config)
    problems = state_dict_mismatches({k: v for k, v in own.items() if k not in kept}, state)
    if problems:
        raise UserError(
            f"{source} does not fit the video UNet's spatial layers ({len(problems)} parameter(s) differ: "
            f"{', '.join(problems[:3])}); give an image UNet of the same sizes, classes and text settings"
        )
    model.load_state_dict(state, strict=False)


def video_unet_s(**overrides) -> VideoUNetModel:
    """unet_s (3 levels of 16/32/64 channels, attention at 8x8) with a temporal block after each of its blocks."""
    return VideoUNetModel(**{**UNET_CONFIGS["unet_s"], **overrides})


def video_unet_m(**overrides) -> VideoUNetModel:
    """unet_m (4 levels, attention at 16x16 and 8x8) with temporal blocks."""
    return VideoUNetModel(**{**UNET_CONFIGS["unet_m"], **overrides})


def video_unet_l(**overrides) -> VideoUNetModel:
    """unet_l (the DDPM paper's CIFAR-10 network) with temporal blocks."""
    return VideoUNetModel(**{**UNET_CONFIGS["unet_l"], **overrides})


VIDEO_UNET_PRESETS = {"video_unet_s": video_unet_s, "video_unet_m": video_unet_m, "video_unet_l": video_unet_l}
