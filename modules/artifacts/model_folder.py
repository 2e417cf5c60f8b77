"""A trained model's folder: the network (save_pretrained, safetensors) and objective.json, which says how it
trained and samples. Written at the end of training, read by sample.py, --init_from and the export, from a local
directory or a Hub model id (downloaded and cached). A diffusers checkpoint (artifacts/diffusers_folder.py) loads
the same way, its record made from its scheduler; one fine-tuned here is saved in diffusers' format again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from modules.artifacts.diffusers_folder import find_diffusers_checkpoint, load_diffusers_network
from modules.config import DDPMArguments, UserError, warn
from modules.files import write_text_atomically
from modules.networks.diffusers_models import DiffusersDenoiser
from modules.networks.presets import MODEL_CLASSES
from modules.networks.video_unet import VideoUNetModel, load_image_unet_weights
from modules.networks.weights import kept_as_built, state_dict_mismatches
from modules.objectives.ddpm import DDPMObjective, with_schedule_of
from modules.objectives.meanflow import MeanFlowObjective
from modules.objectives.registry import objective_from_config
from modules.records import (
    CHECKPOINT_EMA_FILE,
    CHECKPOINT_STATE_FILE,
    OBJECTIVE_FILE,
    describe_error,
    from_dict,
    hub_lookup_error,
)

# The submodule REPA (modules/training/alignment.py) adds to a network while it trains: never saved with it.
REPA_PROJECTOR = "repa_projector"


def save_model(model, objective, directory: str | Path, extra: dict | None = None):
    """`save_pretrained` (safetensors) plus objective.json, which says how the model was trained and samples; for a
    wrapped diffusers network also what wraps it again (its kind and number of train steps)."""
    directory = Path(directory)
    projector = model._modules.pop(REPA_PROJECTOR, None)  # training's, not part of the model
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if projector is not None:
            model._modules[REPA_PROJECTOR] = projector
    record = {"objective": objective.name, "args": dataclasses.asdict(objective.args), **(extra or {})}
    if isinstance(model, DiffusersDenoiser):
        record["network"] = {"kind": model.kind, "num_train_timesteps": model.config.num_train_timesteps}
    write_text_atomically(directory / OBJECTIVE_FILE, json.dumps(record, indent=2))


def load_model(path_or_id: str | Path, device="cpu", revision: str | None = None, token: str | None = None):
    """(model, objective, record) from a directory written by `save_model` (a run's output_dir) or a Hub model id
    pushed by training (downloaded and cached); a VAE or text encoder bundled with it is found inside it. Or from a
    diffusers checkpoint (pipeline or model folder, or Hub id): its network wrapped, sampled as its scheduler says."""
    path = model_dir(path_or_id, revision, token)
    checkpoint = find_diffusers_checkpoint(path)
    if checkpoint is not None:
        record = resolve_components(checkpoint.record, checkpoint.network)
        model = load_diffusers_network(checkpoint).to(device).eval()
        return model, objective_from_config(record), record
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model: '{path_or_id}' holds no saved model (no config.json); give a run's output_dir or a diffusers "
            "pipeline folder"
        )
    config = json.loads((path / "config.json").read_text())
    cls = MODEL_CLASSES.get(config.get("_class_name"))
    if cls is None:
        raise UserError(f"{path / 'config.json'}: unknown model class {config.get('_class_name')!r}")
    if not (path / OBJECTIVE_FILE).is_file():
        raise UserError(f"--model: '{path}' has no {OBJECTIVE_FILE}, so it is unknown how it samples")
    record = resolve_components(json.loads((path / OBJECTIVE_FILE).read_text()), path)
    model = cls.from_pretrained(path, use_safetensors=True).to(device).eval()
    return model, objective_from_config(record), record


# What a guide must share with the model it guides: their outputs are mixed sample by sample, so they must predict the
# same quantity (objective, DDPM schedule), for the same samples (space, size, clip length) under the same conditions.
GUIDE_OBJECTIVE_ARGS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
GUIDE_NETWORK_KEYS = ("in_channels", "out_channels", "sample_size", "num_classes", "text_conditioning")


def load_guide(path_or_id: str, model, record: dict, device="cpu", revision=None, token=None):
    """`sample.py --guide_model` (autoguidance): the network that guides `model` (whose record is `record`) in
    place of its unconditional pass, in eval mode on `device`. It is a saved model (a run's output_dir, a Hub id:
    see `load_model`) or a checkpoint of a run (checkpoints/checkpoint-N: its EMA weights), typically smaller or
    trained less than `model`; it must be of the same kind, resolution and conditioning (`GUIDE_*`), else a
    `UserError` names what differs."""
    folder = model_dir(path_or_id, revision, token)
    flag = f"--guide_model '{path_or_id}'"
    if (folder / CHECKPOINT_STATE_FILE).is_file():
        guide, guide_record = _checkpoint_network(folder, model, record, flag)
    else:
        guide, guide_record = load_model(folder)[::2]
    differences = [
        f"{key}: {guide_record['args'].get(key)!r} vs {record['args'].get(key)!r}"
        for key in GUIDE_OBJECTIVE_ARGS
        if guide_record["args"].get(key) != record["args"].get(key)
    ]
    differences += [
        f"{key}: {guide_record.get(key)!r} vs {record.get(key)!r}"
        for key in ("objective", "num_frames", "latent", "text_encoder")
        if guide_record.get(key) != record.get(key)
    ]
    differences += [
        f"{key}: {guide.config.get(key)!r} vs {model.config.get(key)!r}"
        for key in GUIDE_NETWORK_KEYS
        if guide.config.get(key) != model.config.get(key)
    ]
    if differences:
        raise UserError(
            f"{flag} cannot guide this model: it differs in {'; '.join(differences)} (the guide's value first); "
            "guide with a smaller or less-trained model of the same kind, resolution and conditioning"
        )
    return guide.to(device).eval()


def _checkpoint_network(folder: Path, model, record: dict, flag: str):
    """(network, record) of a training checkpoint: its EMA weights in the network its state records, of its run's
    class; the run's record once it has finished, else that of the model being guided (the same run's, unfinished)."""
    from safetensors.torch import load_file

    run = folder.parent.parent
    if (run / OBJECTIVE_FILE).is_file():
        guide_record = json.loads((run / OBJECTIVE_FILE).read_text())
    else:
        guide_record = record
    config = json.loads((folder / CHECKPOINT_STATE_FILE).read_text()).get("model_config")
    saved_class = (
        json.loads((run / "config.json").read_text()).get("_class_name") if (run / "config.json").is_file() else None
    )
    cls = MODEL_CLASSES.get(saved_class) if saved_class else type(model)
    if config is None or cls is None or not (folder / CHECKPOINT_EMA_FILE).is_file():
        raise UserError(f"{flag} is not a checkpoint of a network of ours (no model config or {CHECKPOINT_EMA_FILE})")
    try:
        guide = cls.from_config(config)
        weights = load_file(str(folder / CHECKPOINT_EMA_FILE))
        guide.load_state_dict({k: v for k, v in weights.items() if not k.startswith(REPA_PROJECTOR + ".")})
    except (TypeError, RuntimeError) as e:
        raise UserError(
            f"{flag}: its EMA weights do not load into a {cls.__name__} ({str(e).splitlines()[0]})"
        ) from None
    return guide, guide_record


def load_pretrained_network(objective, path_or_id: str, revision: str | None = None, token: str | None = None):
    """--init_from a diffusers checkpoint: (its network wrapped, the objective to fine-tune it with, its record), or
    None when `path_or_id` holds a model of ours (`load_pretrained_weights` copies those). The network is fine-tuned
    as it is; a DDPM objective takes the checkpoint's noise schedule (the network was trained for it) and keeps its
    own sampling settings; another objective starts from weights made for DDPM, with a warning."""
    path = model_dir(path_or_id, revision, token)
    checkpoint = find_diffusers_checkpoint(path)
    if checkpoint is None:
        return None
    record = resolve_components(checkpoint.record, checkpoint.network)
    if objective.name == MeanFlowObjective.name:
        raise UserError(
            f"--objective meanflow: --init_from '{path_or_id}' is a diffusers network, which takes no start time r; "
            "start from a run of train_cfm.py (or from scratch)"
        )
    if record["objective"] == objective.name == DDPMObjective.name:
        objective = DDPMObjective(with_schedule_of(objective.args, from_dict(DDPMArguments, record["args"])))
    elif record["objective"] != objective.name:
        warn(
            f"--init_from '{path_or_id}' was trained as {record['objective']}, and is fine-tuned as "
            f"{objective.name}: its weights start from another objective's predictions"
        )
    return load_diffusers_network(checkpoint), objective, record


def load_pretrained_weights(model, path_or_id: str, revision: str | None = None, token: str | None = None):
    """--init_from: copy the weights of a saved model (a run's output_dir or a Hub id) into `model`, which must
    have the same architecture: every parameter present, with the same shape; or, into a video UNet, an image UNet's
    (into its spatial layers)."""
    from safetensors.torch import load_file

    path = model_dir(path_or_id, revision, token)
    weights = path / "diffusion_pytorch_model.safetensors"
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if not weights.is_file():
        raise UserError(f"--init_from '{path_or_id}': no diffusion_pytorch_model.safetensors in {path}")
    if isinstance(model, VideoUNetModel) and config.get("_class_name") == "UNetModel":
        # An image UNet's weights fill a video UNet's spatial layers; its temporal layers stay the identity.
        return load_image_unet_weights(model, load_file(str(weights)), config, f"--init_from '{path_or_id}'")
    if config.get("_class_name") != type(model).__name__:
        raise UserError(
            f"--init_from '{path_or_id}' is a {config.get('_class_name')}, but --model builds a {type(model).__name__}"
        )
    saved_adaln, adaln = config.get("adaln", "zero"), model.config.get("adaln")  # a DiT's; absent before the option
    if adaln is not None and saved_adaln != adaln:
        raise UserError(
            f"--init_from '{path_or_id}' is a DiT with --adaln {saved_adaln}, but this run builds --adaln {adaln}; "
            f"pass --adaln {saved_adaln}"
        )
    if config.get("interval_embedding") and not model.config.get("interval_embedding"):
        raise UserError(
            f"--init_from '{path_or_id}' is a MeanFlow network (it takes the start time r of an average velocity); "
            "fine-tune it with --objective meanflow"
        )
    state, own = load_file(str(weights)), model.state_dict()
    kept = kept_as_built(own, model.config, config)  # a flow network's into MeanFlow's: its interval embedding
    problems = state_dict_mismatches({k: v for k, v in own.items() if k not in kept}, state)
    if problems:
        raise UserError(
            f"--init_from '{path_or_id}' does not fit the model being trained ({len(problems)} parameter(s) differ: "
            f"{', '.join(problems[:3])}); train the same --model with the same sizes, classes and text settings"
        )
    model.load_state_dict(state, strict=not kept)


WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")  # pickled or foreign weights: never uploaded


def download_model(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A model folder from the Hub (cached), or a `UserError` that says why and suggests a local path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, ignore_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]
        )
    except Exception as e:  # noqa: BLE001 - bad id, network errors: all the user's to fix
        missing = (
            "is neither a local directory nor a model on the Hub (or it is private: log in or pass a token); for a "
            "local model give the path of its directory"
        )
        if known := hub_lookup_error(e, f"model {repo_id!r}", revision, missing):
            raise known from None
        if isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled):
            raise UserError(
                f"model {repo_id!r} is not a local directory and could not be downloaded "
                f"({describe_error(e, token)}); offline (HF_HUB_OFFLINE=1), only models already in the Hub cache "
                "load: download it first, or give a local path"
            ) from None
        raise UserError(
            f"model {repo_id!r} is not a local directory and could not be downloaded from the Hub "
            f"({describe_error(e, token)}); check the id and the network, or give a local path"
        ) from None
    return Path(folder)


def model_dir(path_or_id: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local model directory as is, else a Hub model id downloaded."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise UserError(f"model '{path_or_id}': no such directory (nor a Hub id of the form user/name)")
    return download_model(str(path_or_id), revision, token)


def resolve_components(record: dict, folder: Path) -> dict:
    """A model record whose bundled VAE / text encoder (relative sources, see `bundle_components`) point into
    `folder`, so that the model loads from any working directory."""
    record = json.loads(json.dumps(record))
    latent_vae = record.get("latent", {}).get("vae", {})
    for part in (latent_vae, record.get("text_encoder") or {}):
        source = part.get("source")
        if source and not Path(source).is_absolute() and (folder / source).is_dir():
            part["source"] = str((folder / source).resolve())
    return record
