"""What a run records about itself: its settings as a flat dict and back, and its command line, with every
secret (a Hub token) left out or shown as ***."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys

from modules.config import UserError

OBJECTIVE_FILE = "objective.json"  # next to a saved model: how it trained and samples
RUN_CONFIG_FILE = "run_config.json"  # in a run dir: the training command (token hidden) and every setting
# In a training checkpoint (modules/training/checkpoint.py): step, schedule and model config (written last), and the
# EMA weights, which a checkpoint can also be sampled from (sample.py --guide_model).
CHECKPOINT_STATE_FILE = "training_state.json"
CHECKPOINT_EMA_FILE = "ema.safetensors"


def from_dict(cls, values: dict):
    """An instance of dataclass `cls` from those keys of `values` that are its fields (a record written by another
    version may hold more, or fewer, and the rest keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in values.items() if k in names})


SECRET_FIELDS = ("hub_token",)  # never written to disk or sent to trackers


def to_dict(*configs) -> dict:
    """All fields of the given dataclass instances as one flat dict (for run records and trackers), without secrets."""
    out = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    return {k: v for k, v in out.items() if k not in SECRET_FIELDS}


SECRET_FLAGS = ("--hub_token",)


def command_line(script: str, argv=None) -> str:
    """The command as run (`argv`, default sys.argv[1:]), with the value of every secret flag shown as ***."""
    args, hide = [], False
    for arg in sys.argv[1:] if argv is None else argv:
        arg = str(arg)
        flag = arg.split("=", 1)[0]
        args.append("***" if hide else f"{flag}=***" if "=" in arg and flag in SECRET_FLAGS else arg)
        hide = arg in SECRET_FLAGS
    return shlex.join(["python", script, *args])


def redact(text: str, token: str | None = None) -> str:
    """`text` with the given token and $HF_TOKEN replaced by ***."""
    for secret in filter(None, (token, os.environ.get("HF_TOKEN"))):
        text = text.replace(secret, "***")
    return text


def describe_error(error: Exception, token: str | None = None) -> str:
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {redact(reason, token)}"


def hub_lookup_error(error: Exception, subject: str, revision: str | None, missing: str) -> UserError | None:
    """The one line for a Hub lookup of `subject` (a model id, a flag's repo) that the user can fix: no such
    revision, a gated repo, or a repo that is not there or private (`missing` says what that means to the caller);
    None for any other error."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return UserError(f"{subject} has no revision {revision!r} on the Hub")
    if isinstance(error, GatedRepoError):
        return UserError(f"{subject} is gated: accept its terms on the Hub and log in")
    if isinstance(error, RepositoryNotFoundError):
        return UserError(f"{subject} {missing}")
    return None
