"""A diffusers checkpoint read as a model of ours: its network, wrapped to (x, t, cond), and the record that
objective.json holds for our own models (objective and settings, class names, the latent VAE).

What is found where:
    pipeline folder     model_index.json, unet/ or transformer/ (UNet2DModel, DiTTransformer2DModel), scheduler/
                        scheduler_config.json (DDPMScheduler, DDIMScheduler), vae/ (AutoencoderKL) for a latent
                        model, and DiTPipeline's id2label (the class names) in model_index.json
    bare model folder   config.json of one of those classes, sampled as its scheduler says: scheduler_config.json
                        next to it, or ../scheduler/ when the folder is a pipeline's component (the pipeline is read);
                        or as our objective.json says (a diffusers network fine-tuned here and saved)

A checkpoint that is neither ours nor of those classes is refused with the file and the `_class_name` found.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import diffusers

from modules.config import UserError
from modules.data.latents import scaled_latent_record
from modules.networks.diffusers_models import (
    NETWORK_CLASSES,
    NETWORK_KINDS,
    DiffusersDenoiser,
    check_network_config,
    network_class_name,
)
from modules.networks.presets import MODEL_CLASSES
from modules.networks.vae import load_vae
from modules.objectives.ddpm import ddpm_arguments_from_scheduler
from modules.records import OBJECTIVE_FILE

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_DENOISERS = ("unet", "transformer")
DIT_GUIDANCE = 4.0  # DiTPipeline's default guidance scale


@dataclass
class DiffusersCheckpoint:
    """Where a diffusers network is, its class, and the record of how it samples (objective.json's content)."""

    network: Path  # the folder with its config.json and weights
    network_class: str  # a key of NETWORK_CLASSES
    record: dict


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def find_diffusers_checkpoint(path: Path) -> DiffusersCheckpoint | None:
    """The diffusers checkpoint in `path`, or None when `path` holds a model of ours (or no model at all: the
    caller says so). A model of another class is refused, naming its config file and class."""
    if (path / MODEL_INDEX).is_file():
        return _pipeline(path)
    if not (path / "config.json").is_file():
        return None
    config = read_json(path / "config.json")
    if config.get("_class_name") in MODEL_CLASSES:
        return None
    name = _supported_network(
        config,
        path / "config.json",
        f"is neither a model of ours ({', '.join(MODEL_CLASSES)}) nor a supported diffusers model "
        f"({', '.join(NETWORK_CLASSES)})",
    )
    if (path / OBJECTIVE_FILE).is_file():  # fine-tuned here: our record says how it samples
        record = read_json(path / OBJECTIVE_FILE)
        kind = (record.get("network") or {}).get("kind")
        if kind != NETWORK_KINDS[name]:
            raise UserError(f"{path / OBJECTIVE_FILE}: network kind {kind!r} does not match config.json's {name}")
        return DiffusersCheckpoint(path, name, record)
    if (path.parent / MODEL_INDEX).is_file() and path.name in read_json(path.parent / MODEL_INDEX):
        return _pipeline(path.parent)  # a pipeline's component: the pipeline has its scheduler and VAE
    if (path / SCHEDULER_CONFIG).is_file():
        scheduler = path / SCHEDULER_CONFIG
        return DiffusersCheckpoint(path, name, _record(path, name, config, read_json(scheduler), str(scheduler)))
    raise UserError(
        f"{path / 'config.json'}: a diffusers {name} with nothing that says how it samples: give its pipeline "
        f"folder (with scheduler/{SCHEDULER_CONFIG}), or put the scheduler's {SCHEDULER_CONFIG} next to config.json"
    )


def _supported_network(config: dict, config_path: Path, unsupported: str) -> str:
    """The diffusers network class that `config` (read from `config_path`) builds, its settings checked; a one-line
    error naming the file and its _class_name, followed by `unsupported`, when it is none that we wrap."""
    name = network_class_name(config)
    if name is None:
        raise UserError(f"{config_path}: _class_name {config.get('_class_name')!r} {unsupported}")
    check_network_config(name, config, str(config_path))
    return name


def _pipeline(path: Path) -> DiffusersCheckpoint:
    """A pipeline folder: its unet/ or transformer/, scheduler/ and vae/."""
    index = read_json(path / MODEL_INDEX)
    component = next((c for c in PIPELINE_DENOISERS if c in index), None)
    if component is None:
        raise UserError(
            f"{path / MODEL_INDEX}: _class_name {index.get('_class_name')!r} has no unet or transformer component"
        )
    network = path / component
    if not (network / "config.json").is_file():
        raise UserError(f"{path / MODEL_INDEX} names a {component}, but {network / 'config.json'} does not exist")
    config = read_json(network / "config.json")
    name = _supported_network(
        config,
        network / "config.json",
        f"is not a supported diffusers model ({', '.join(NETWORK_CLASSES)}; pipeline {index.get('_class_name')})",
    )
    scheduler = path / "scheduler" / SCHEDULER_CONFIG
    if not scheduler.is_file():
        raise UserError(f"{path}: a {index.get('_class_name')} without {scheduler.relative_to(path)}")
    scheduler_config, where = read_json(scheduler), str(scheduler)
    declared = (index.get("scheduler") or [None, None])[-1]
    declared_class = getattr(diffusers, declared, None) if isinstance(declared, str) else None
    if isinstance(declared_class, type) and issubclass(declared_class, diffusers.SchedulerMixin):
        # diffusers builds the scheduler class that model_index.json names, from the config's settings
        if declared != scheduler_config.get("_class_name"):
            scheduler_config["_class_name"] = declared
            where = f"{scheduler} (as {path / MODEL_INDEX} names its class)"
    vae = path / "vae" if "vae" in index and (path / "vae" / "config.json").is_file() else None
    record = _record(path, name, config, scheduler_config, where, vae, index.get("id2label"))
    return DiffusersCheckpoint(network, name, record)


def _record(source: Path, name: str, config: dict, scheduler: dict, where: str, vae=None, id2label=None) -> dict:
    """objective.json's content for a diffusers checkpoint: DDPM on its scheduler's schedule (`scheduler`, the
    config read from `where`), sampled as its pipeline samples; DiTPipeline's class names and guidance; the VAE's
    latent scaling."""
    args = ddpm_arguments_from_scheduler(scheduler, where)
    if name == "DiTTransformer2DModel":
        args = dataclasses.replace(args, guidance_scale=DIT_GUIDANCE)
    record = {
        "objective": "ddpm",
        "args": dataclasses.asdict(args),
        "class_names": [id2label[str(i)] for i in range(len(id2label))] if id2label else None,
        "network": {"kind": NETWORK_KINDS[name], "num_train_timesteps": args.num_train_timesteps},
        "diffusers_checkpoint": str(source.resolve()),
    }
    if vae is not None:
        size = config.get("sample_size")
        record["latent"] = scaled_latent_record(
            load_vae(str(vae.resolve())), size[0] if isinstance(size, list) else size
        )
    return record


def load_diffusers_network(checkpoint: DiffusersCheckpoint) -> DiffusersDenoiser:
    """The checkpoint's network, from its safetensors weights, wrapped to (x, t, cond)."""
    folder = checkpoint.network
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
        found = f" (it holds {', '.join(pickled)}, which are pickled and not read)" if pickled else ""
        raise UserError(
            f"{folder}: no diffusion_pytorch_model.safetensors{found}; weights are read from safetensors only: use a "
            "revision that has them (on the Hub, often an open pull request: --revision refs/pr/<n>) or convert them"
        )
    cls = NETWORK_CLASSES[checkpoint.network_class]
    try:
        network = cls.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{folder}: could not load the {checkpoint.network_class} ({reason})") from None
    return DiffusersDenoiser.wrap(network, checkpoint.record["network"]["num_train_timesteps"])


def diffusers_network_from_config(checkpoint: DiffusersCheckpoint) -> DiffusersDenoiser:
    """The checkpoint's network built from its config alone, without weights (to size it on the meta device)."""
    config = {k: v for k, v in read_json(checkpoint.network / "config.json").items() if not k.startswith("_")}
    steps = checkpoint.record["network"]["num_train_timesteps"]
    return DiffusersDenoiser(network_class=checkpoint.network_class, network_config=config, num_train_timesteps=steps)
