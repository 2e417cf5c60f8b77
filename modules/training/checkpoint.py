"""Training checkpoints: `<output_dir>/checkpoints/checkpoint-<step>/`, written whole or not at all.

A checkpoint holds what `accelerator.save_state` writes (model, optimizer, RNG states of every process), the EMA
weights (safetensors) and `training_state.json` (step, images seen, LR schedule, the model's config). It is written
under a temporary name and renamed once complete, so a directory named `checkpoint-<step>` is always whole; resume
needs nothing else, because the data position is derived from the step (see data.ResumableBatchSampler).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path

from modules.config import UserError
from modules.files import write_text_atomically
from modules.records import CHECKPOINT_EMA_FILE as EMA_FILE
from modules.records import CHECKPOINT_STATE_FILE as STATE_FILE

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_step(name: str) -> int | None:
    """The step of a folder named `checkpoint-<step>`, else None."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those holding training_state.json, written last), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (s, p) for p in root.iterdir() if (s := checkpoint_step(p.name)) is not None and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """'latest' -> newest complete checkpoint or None (fresh start); a path -> that checkpoint, which must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"--resume_from_checkpoint: '{path}' is not a complete checkpoint (no {STATE_FILE}); "
            f"complete ones: {', '.join(p.name for p in list_checkpoints(output_dir)) or 'none'}"
        )
    return path


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def check_compatible(path: Path, model):
    """Refuse a checkpoint made for another model than `model`, naming every key whose value differs. A key the
    checkpoint does not record (made before that option existed) counts as the option's default, which is what
    the model was built with then."""
    model_config = dict(model.config)
    saved = {**init_defaults(type(model)), **read_state(path).get("model_config", {})}
    keys = sorted(k for k in set(saved) | set(model_config) if not k.startswith("_"))
    diff = [k for k in keys if _jsonable(saved.get(k)) != _jsonable(model_config.get(k))]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {model_config.get(k)!r}" for k in diff)
        raise UserError(f"checkpoint {path} was made for a different model ({detail})")


def init_defaults(cls) -> dict:
    """The keyword defaults of `cls.__init__`: a diffusers model's config values when they are not given."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _jsonable(value):
    return json.loads(json.dumps(value))


def profile_file(std: float) -> str:
    """A post-hoc EMA profile's weights in a checkpoint (--ema_phema_stds)."""
    return f"ema-phema-{std:.4f}.safetensors"


def save_checkpoint(
    accelerator, output_dir, step: int, ema, state: dict, total_limit: int | None, profiles=()
) -> Path:
    """Save on all processes (sharded states need every rank); only the main process writes shared files.
    `profiles`: the post-hoc EMA's power-function EMAs, each beside the EMA."""
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    partial = root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.partial"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        for average in (ema, *profiles):
            average.gather()  # a sharded EMA is assembled on the main process, which writes it whole
        if accelerator.is_main_process:
            save_file(ema.state_dict(), str(partial / EMA_FILE))
            for profile in profiles:
                save_file(profile.state_dict(), str(partial / profile_file(profile.std)))
            write_text_atomically(
                partial / STATE_FILE, json.dumps({**state, "step": step, "ema_step": ema.step}, indent=2)
            )
            _fsync_tree(partial)
    except OSError as e:  # e.g. a full disk: the previous checkpoints are untouched, so stop and say so
        shutil.rmtree(partial, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no checkpoint is complete"
        raise UserError(
            f"could not write checkpoint-{step} in {root} ({e.strerror or e}): {kept}; free space and rerun with "
            "--resume_from_checkpoint latest"
        ) from None
    if accelerator.is_main_process:
        if final.exists():  # an earlier run's checkpoint of the same step: replace it only now we have a whole one
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema, profiles=()) -> dict:
    """Restore model, optimizer and RNG states through Accelerate, the EMA and the post-hoc EMA's profiles;
    returns training_state.json."""
    from safetensors.torch import load_file

    written, now = _written_under(Path(path)), _KINDS.get(accelerator.distributed_type.name, _OTHER)
    if written != now:
        raise UserError(
            f"checkpoint {path} was written under {written} and this run is under {now}: resume it with "
            "the accelerate config that wrote it"
        )
    accelerator.load_state(str(path))
    state = read_state(path)
    missing = [profile_file(p.std) for p in profiles if not (Path(path) / profile_file(p.std)).is_file()]
    if missing:
        raise UserError(
            f"checkpoint {path} holds no post-hoc EMA profile {', '.join(missing)}: it was made with other (or no) "
            "--ema_phema_stds; resume it with the same"
        )
    ema.load_state_dict(load_file(str(Path(path) / EMA_FILE), device=str(ema.device)), state["ema_step"])
    for profile in profiles:
        weights = load_file(str(Path(path) / profile_file(profile.std)), device=str(profile.device))
        profile.load_state_dict(weights, state["ema_step"])
    return state


# How accelerate's save_state lays out model and optimizer: sharded under FSDP and DeepSpeed, whole otherwise.
_KINDS, _OTHER = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}, "neither FSDP nor DeepSpeed"


def _written_under(path: Path) -> str:
    if any(path.glob("pytorch_model_fsdp*")):
        return _KINDS["FSDP"]
    if (path / "pytorch_model").is_dir():  # DeepSpeed's engine.save_checkpoint, under accelerate's tag
        return _KINDS["DEEPSPEED"]
    return _OTHER


def _fsync_tree(root: Path):
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
