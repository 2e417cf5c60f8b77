"""From a preset name (`--model`, `--vae_model`) to a network sized for the data."""

from __future__ import annotations

import functools

from modules.config import ModelArguments, UserError, VAEArguments
from modules.networks.dit import DIT_PRESETS, DiTModel
from modules.networks.unet import UNET_PRESETS, UNetModel
from modules.networks.vae import KLVAE, VAE_CONFIGS, VAE_PRESETS
from modules.networks.video_dit import VIDEO_DIT_PRESETS, VideoDiTModel
from modules.networks.video_unet import VIDEO_UNET_PRESETS, VideoUNetModel

MODEL_CLASSES = {
    "UNetModel": UNetModel,
    "DiTModel": DiTModel,
    "KLVAE": KLVAE,
    "VideoDiTModel": VideoDiTModel,
    "VideoUNetModel": VideoUNetModel,
}


VIDEO_PRESETS = {**VIDEO_UNET_PRESETS, **VIDEO_DIT_PRESETS}
ALL_PRESETS = (*UNET_PRESETS, *DIT_PRESETS, *VIDEO_PRESETS)


def is_video_model(name: str) -> bool:
    """Whether preset `name` generates clips (B, F, C, H, W) rather than images."""
    return name in VIDEO_PRESETS


def build_model(
    args: ModelArguments,
    in_channels: int,
    resolution: int,
    num_classes: int = 0,
    text=None,
    num_frames: int = 0,
    interval_embedding: bool = False,
):
    """The preset named by `args.model`, sized for the data; checks that the resolution fits its downsampling.
    `text`: the text settings of a text-conditional model (`TextConditioner.model_config()`). `num_frames`: the
    clip length of clip data (a video preset's), 0 for images (an image preset's). `interval_embedding`: the network
    also takes r, the start of the interval of an average velocity (MeanFlow)."""
    if args.model not in ALL_PRESETS:
        raise UserError(f"unknown --model '{args.model}' (presets: {', '.join(ALL_PRESETS)})")
    if is_video_model(args.model) and not num_frames:
        raise UserError(
            f"--model {args.model} generates clips, but the data are images; train it on clips (--dataset_name "
            "moving_fashion_mnist, or video files with --num_frames), or use an image model"
        )
    if num_frames and not is_video_model(args.model):
        raise UserError(
            f"--model {args.model} is an image model, but the data are clips of {num_frames} frames; use a video "
            f"model ({', '.join(VIDEO_PRESETS)}), or train the image model on the frames with --shared_noise"
        )
    common = dict(in_channels=in_channels, out_channels=in_channels, sample_size=resolution, num_classes=num_classes)
    common.update(text or {})
    if interval_embedding:  # absent otherwise, so other models' configs stay as they were
        common["interval_embedding"] = True
    if args.model in UNET_PRESETS or args.model in VIDEO_UNET_PRESETS:
        model, unit = _unet(args, resolution, common), "the UNet's total downsampling"
    else:
        model, unit = _dit(args, resolution, num_frames, common), "the patch size"
    if resolution % model.downsample_factor:
        raise UserError(
            f"--resolution {resolution} is not divisible by {model.downsample_factor}, {unit} of {args.model}; "
            f"use a multiple of {model.downsample_factor}"
        )
    return model


def _unet(args: ModelArguments, resolution: int, common: dict):
    """A UNet preset, or a video UNet's (the same, with temporal blocks)."""
    if args.adaln != "zero":
        raise UserError(f"--adaln {args.adaln} is a DiT option, but --model {args.model} is a UNet")
    if args.base_channels is not None:
        common["base_channels"] = args.base_channels
    if args.dropout is not None:
        common["dropout"] = args.dropout
    if args.model in VIDEO_UNET_PRESETS:
        build = functools.partial(VIDEO_UNET_PRESETS[args.model], temporal_conv=args.temporal_conv)
    else:
        build = UNET_PRESETS[args.model]
    try:
        return build(**common)
    except ValueError as e:  # the preset's own check of sample_size against its downsampling
        raise UserError(f"--model {args.model} at --resolution {resolution}: {e}") from None


def _dit(args: ModelArguments, resolution: int, num_frames: int, common: dict):
    """A DiT preset, or a video DiT's (patches over time too, --video_attention)."""
    if args.dropout is not None:
        raise UserError(f"--dropout is a UNet option, but --model {args.model} is a DiT (it has no dropout)")
    if args.patch_size not in (1, 2, 4, 8):
        raise UserError(f"--patch_size must be 2, 4 or 8, got {args.patch_size}")
    if resolution % args.patch_size:
        raise UserError(f"--resolution {resolution} is not divisible by --patch_size {args.patch_size}")
    settings = dict(patch_size=args.patch_size, qk_norm=args.qk_norm, pos_embed=args.pos_embed, mlp=args.mlp)
    settings["adaln"] = args.adaln
    if args.model in DIT_PRESETS:
        return DIT_PRESETS[args.model](**settings, **common)
    if args.temporal_patch_size < 1 or num_frames % args.temporal_patch_size:
        raise UserError(
            f"--num_frames {num_frames} is not divisible by --temporal_patch_size {args.temporal_patch_size}"
        )
    video = dict(num_frames=num_frames, temporal_patch_size=args.temporal_patch_size)
    try:
        return VIDEO_DIT_PRESETS[args.model](**settings, **video, video_attention=args.video_attention, **common)
    except ValueError as e:  # the model's own check of its settings (heads and positions)
        raise UserError(f"--model {args.model}: {e}") from None


def build_vae(args: VAEArguments, in_channels: int, resolution: int) -> KLVAE:
    """The `--vae_model` preset for the data, with `--latent_channels` and `--vae_base_channels` applied."""
    if args.vae_model not in VAE_PRESETS:
        raise UserError(f"unknown --vae_model '{args.vae_model}' (presets: {', '.join(VAE_PRESETS)})")
    if args.latent_channels < 1:
        raise UserError(f"--latent_channels must be positive, got {args.latent_channels}")
    overrides = dict(in_channels=in_channels, sample_size=resolution, latent_channels=args.latent_channels)
    if args.vae_base_channels is not None:
        preset = VAE_CONFIGS[args.vae_model]["block_out_channels"]
        overrides["block_out_channels"] = tuple(c * args.vae_base_channels // preset[0] for c in preset)
    try:
        return VAE_PRESETS[args.vae_model](**overrides)
    except ValueError as e:
        raise UserError(f"--vae_model {args.vae_model} at --resolution {resolution}: {e}") from None
