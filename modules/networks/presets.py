"""From a preset name (`--model`, `--vae_model`) to a network sized for the data."""

from __future__ import annotations

from modules.config import ModelArguments, UserError, VAEArguments
from modules.networks.dit import DIT_PRESETS, DiTModel
from modules.networks.unet import UNET_PRESETS, UNetModel
from modules.networks.vae import KLVAE, VAE_CONFIGS, VAE_PRESETS
from modules.networks.video_dit import VideoDiTModel
from modules.networks.video_unet import VideoUNetModel

MODEL_CLASSES = {
    "UNetModel": UNetModel,
    "DiTModel": DiTModel,
    "KLVAE": KLVAE,
    "VideoDiTModel": VideoDiTModel,
    "VideoUNetModel": VideoUNetModel,
}


def build_model(args: ModelArguments, in_channels: int, resolution: int, num_classes: int = 0, text=None):
    """The preset named by `args.model`, sized for the data; checks that the resolution fits its downsampling.
    `text`: the text settings of a text-conditional model (`TextConditioner.model_config()`)."""
    common = dict(in_channels=in_channels, out_channels=in_channels, sample_size=resolution, num_classes=num_classes)
    common.update(text or {})
    if args.dropout is not None:
        common["dropout"] = args.dropout
    if args.model in UNET_PRESETS:
        if args.adaln != "zero":
            raise UserError(f"--adaln {args.adaln} is a DiT option, but --model {args.model} is a UNet")
        if args.base_channels is not None:
            common["base_channels"] = args.base_channels
        try:
            model = UNET_PRESETS[args.model](**common)
        except ValueError as e:  # the preset's own check of sample_size against its downsampling
            raise UserError(f"--model {args.model} at --resolution {resolution}: {e}") from None
        unit = "the UNet's total downsampling"
    elif args.model in DIT_PRESETS:
        if args.patch_size not in (1, 2, 4, 8):
            raise UserError(f"--patch_size must be 2, 4 or 8, got {args.patch_size}")
        if resolution % args.patch_size:
            raise UserError(f"--resolution {resolution} is not divisible by --patch_size {args.patch_size}")
        model = DIT_PRESETS[args.model](
            patch_size=args.patch_size,
            qk_norm=args.qk_norm,
            pos_embed=args.pos_embed,
            mlp=args.mlp,
            adaln=args.adaln,
            **common,
        )
        unit = "the patch size"
    else:
        names = ", ".join([*UNET_PRESETS, *DIT_PRESETS])
        raise UserError(f"unknown --model '{args.model}' (presets: {names})")
    if resolution % model.downsample_factor:
        raise UserError(
            f"--resolution {resolution} is not divisible by {model.downsample_factor}, {unit} of {args.model}; "
            f"use a multiple of {model.downsample_factor}"
        )
    return model


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
