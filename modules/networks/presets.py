"""From a preset name (`--model`) to a network sized for the data."""

from __future__ import annotations

from modules.config import ModelArguments, UserError
from modules.networks.dit import DIT_PRESETS, DiTModel
from modules.networks.unet import UNET_PRESETS, UNetModel
from modules.networks.vae import KLVAE

MODEL_CLASSES = {"UNetModel": UNetModel, "DiTModel": DiTModel, "KLVAE": KLVAE}


def build_model(args: ModelArguments, in_channels: int, resolution: int, num_classes: int = 0, text=None):
    """The preset named by `args.model`, sized for the data; checks that the resolution fits its downsampling.
    `text`: the text settings of a text-conditional model (`TextConditioner.model_config()`)."""
    common = dict(in_channels=in_channels, out_channels=in_channels, sample_size=resolution, num_classes=num_classes)
    common.update(text or {})
    if args.dropout is not None:
        common["dropout"] = args.dropout
    if args.model in UNET_PRESETS:
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
            patch_size=args.patch_size, qk_norm=args.qk_norm, pos_embed=args.pos_embed, mlp=args.mlp, **common
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
