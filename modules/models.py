"""From a preset name to a network, and from a saved directory back to (network, objective)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from modules.config import DDPMArguments, FlowArguments, ModelArguments, UserError, from_dict
from modules.dit import DIT_PRESETS, DiTModel
from modules.files import write_text_atomically
from modules.hub import model_dir, resolve_components
from modules.unet import UNET_PRESETS, UNetModel
from modules.vae import KLVAE, VAEArguments

MODEL_CLASSES = {"UNetModel": UNetModel, "DiTModel": DiTModel, "KLVAE": KLVAE}
OBJECTIVE_FILE = "objective.json"


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


def objective_from_config(config: dict):
    """Rebuild the objective recorded next to a saved model."""
    from modules.ddpm import DDPMObjective
    from modules.flow import FlowObjective
    from modules.vae import VAEObjective

    kinds = {
        "flow": (FlowObjective, FlowArguments),
        "ddpm": (DDPMObjective, DDPMArguments),
        "vae": (VAEObjective, VAEArguments),
    }
    if config.get("objective") not in kinds:
        raise UserError(f"unknown objective {config.get('objective')!r} in {OBJECTIVE_FILE}")
    cls, args_cls = kinds[config["objective"]]
    return cls(from_dict(args_cls, config["args"]))


def save_model(model, objective, directory: str | Path, extra: dict | None = None):
    """`save_pretrained` (safetensors) plus objective.json, which says how the model was trained and samples."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    record = {"objective": objective.name, "args": dataclasses.asdict(objective.args), **(extra or {})}
    write_text_atomically(directory / OBJECTIVE_FILE, json.dumps(record, indent=2))


def load_model(path_or_id: str | Path, device="cpu", revision: str | None = None, token: str | None = None):
    """(model, objective, record) from a directory written by `save_model` (a run's output_dir) or a Hub model id
    pushed by training (downloaded and cached); a VAE or text encoder bundled with it is found inside it."""
    path = model_dir(path_or_id, revision, token)
    if not (path / "config.json").is_file():
        raise UserError(f"--model: '{path_or_id}' holds no saved model (no config.json); give a run's output_dir")
    config = json.loads((path / "config.json").read_text())
    cls = MODEL_CLASSES.get(config.get("_class_name"))
    if cls is None:
        raise UserError(f"{path / 'config.json'}: unknown model class {config.get('_class_name')!r}")
    if not (path / OBJECTIVE_FILE).is_file():
        raise UserError(f"--model: '{path}' has no {OBJECTIVE_FILE}, so it is unknown how it samples")
    record = resolve_components(json.loads((path / OBJECTIVE_FILE).read_text()), path)
    model = cls.from_pretrained(path, use_safetensors=True).to(device).eval()
    return model, objective_from_config(record), record


def load_pretrained_weights(model, path_or_id: str, revision: str | None = None, token: str | None = None):
    """--init_from: copy the weights of a saved model (a run's output_dir or a Hub id) into `model`, which must
    have the same architecture: every parameter present, with the same shape."""
    from safetensors.torch import load_file

    path = model_dir(path_or_id, revision, token)
    weights = path / "diffusion_pytorch_model.safetensors"
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if not weights.is_file():
        raise UserError(f"--init_from '{path_or_id}': no diffusion_pytorch_model.safetensors in {path}")
    if config.get("_class_name") != type(model).__name__:
        raise UserError(
            f"--init_from '{path_or_id}' is a {config.get('_class_name')}, but --model builds a {type(model).__name__}"
        )
    state = load_file(str(weights))
    own = model.state_dict()
    problems = [f"{k} missing" for k in own if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in own]
    problems += [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise UserError(
            f"--init_from '{path_or_id}' does not fit the model being trained ({len(problems)} parameter(s) differ: "
            f"{', '.join(problems[:3])}); train the same --model with the same sizes, classes and text settings"
        )
    model.load_state_dict(state)
