"""What a run logs: metrics.jsonl in the run dir (always) and Accelerate's trackers (--report_to: TensorBoard,
Weights & Biases, MLflow), the window of steps between two log lines, and the process's peak memory."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import re
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from modules.config import UserError
from modules.records import redact

TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "all")
PIP_NAMES = {"mlflow": "mlflow-skinny"}  # the package that provides the module, when its name differs


def wandb_login_state() -> str:
    """'offline' when WANDB_MODE says so, 'key' when an API key is at hand (env or `wandb login`'s netrc entry),
    else 'none'. Only files and the environment are read: no network."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "key"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "key" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "none"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "none"


def resolve_trackers(report_to: str, out: Path) -> list[str]:
    """The Accelerate trackers for --report_to. A tracker asked for by name must be installed (else a UserError, before
    anything is written); `all` takes those that are, with a warning for each missing one. wandb without a login
    logs offline into the run dir, to `wandb sync` later."""
    wanted = {"none": [], "all": ["tensorboard", "wandb", "mlflow"]}.get(report_to, [report_to])
    trackers = []
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            install = f"pip install {PIP_NAMES.get(name, name)}"
            if report_to != "all":
                raise UserError(f"--report_to {name}: {name} is not installed; {install}, or pass --report_to none")
            warnings.warn(f"--report_to all: {name} is not installed ({install}); not logging to it", stacklevel=2)
            continue
        if name == "wandb" and wandb_login_state() == "none":
            warnings.warn(
                "--report_to wandb: not logged in (no WANDB_API_KEY, no `wandb login`); logging offline to "
                f"{out / 'wandb'}; upload later with `wandb sync {out / 'wandb'}/offline-run-*`",
                stacklevel=2,
            )
            os.environ["WANDB_MODE"] = "offline"
        trackers.append(name)
    return trackers


def tracker_settings(trackers: list[str], out: Path, continued_wandb: dict | None = None) -> dict:
    """Accelerate's init_kwargs for the trackers: wandb writes into the run dir and continues the run a resumed
    checkpoint names (`continued_wandb`); MLflow names its run after the run dir (its experiment is the project name,
    or $MLFLOW_EXPERIMENT_NAME)."""
    settings = {}
    if "wandb" in trackers:
        settings["wandb"] = wandb_init_kwargs(out, continued_wandb)
    if "mlflow" in trackers:
        settings["mlflow"] = {"run_name": out.resolve().name}
    return settings


_MLFLOW_DEFAULT_URIS: set[str] = set()  # the run-dir stores set here (mlflow.set_tracking_uri also exports them)


def mlflow_store(out: Path) -> str:
    """Where MLflow logs: $MLFLOW_TRACKING_URI (a server, a database or a folder) when the user set it, else a file
    store in the run dir, out/mlruns. MLflow 3 keeps its file store in maintenance mode and refuses it unless
    MLFLOW_ALLOW_FILE_STORE=true, which is set here only for that default. mlflow.set_tracking_uri exports the URI to
    the environment, so a URI this function set for an earlier run in the process is not the user's."""
    import mlflow  # optional: only with --report_to mlflow (or all)

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or uri in _MLFLOW_DEFAULT_URIS:
        store = out / "mlruns"
        (store / ".trash").mkdir(parents=True, exist_ok=True)  # mlflow keeps its store per URI: not made again
        uri = store.resolve().as_uri()
        _MLFLOW_DEFAULT_URIS.add(uri)
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(uri)  # also when set: a run before it in this process may have set another
    return uri


def hide_password(uri: str) -> str:
    """`uri` with the credentials of its user part (https://user:password@host) shown as ***, to print it."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def end_mlflow_run_on_error(exc_type, exc, traceback):
    """An exit callback (ExitStack.push): a run that raises ends its MLflow run as FAILED (Accelerate ends it only at
    the end of training), so that the process could start another."""
    if exc_type is not None:
        import mlflow  # optional: only with --report_to mlflow (or all)

        mlflow.end_run("FAILED")


def mlflow_params(record: dict, token: str | None = None) -> dict[str, str]:
    """`flat_params` cut to MLflow's limit on a parameter's length."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # optional: only with --report_to mlflow (or all)

    return flat_params(record, MAX_PARAM_VAL_LENGTH, token)


def flat_params(record: dict, max_length: int, token: str | None = None) -> dict[str, str]:
    """A run record (run_config.json: script, command, config) as MLflow parameters: the config's settings at the top
    level, nested values under dotted keys, names limited to MLflow's characters, every value a string of at most
    `max_length` characters (longer ones cut, ending in '...'), and secrets shown as ***."""
    leaves = {}
    pending = [("", {**{k: v for k, v in record.items() if k != "config"}, **record.get("config", {})})]
    while pending:
        prefix, values = pending.pop()
        for key, value in values.items():
            name = re.sub(r"[^\w./\- :]", "_", f"{prefix}{key}")[:250]
            if isinstance(value, dict) and value:
                pending.append((f"{name}.", value))
                continue
            text = redact(str(value), token)
            leaves[name] = text if len(text) <= max_length else text[: max_length - 3] + "..."
    return leaves


def wandb_run(accelerator):
    """The wandb run this process logs to (the main process, with --report_to wandb), else None."""
    if not accelerator.is_main_process:
        return None
    return next((t.tracker for t in accelerator.trackers if t.name == "wandb"), None)


def wandb_record(accelerator) -> dict | None:
    """What a checkpoint keeps of the wandb run, so that a resumed run continues it: id, entity, project."""
    run = wandb_run(accelerator)
    return None if run is None else {"id": run.id, "entity": run.entity or None, "project": run.project}


def wandb_init_kwargs(out: Path, continued: dict | None) -> dict:
    """wandb.init's arguments: its files in the run dir and, for a resumed run, the run to continue."""
    kwargs = {"dir": str(out)}
    if continued:
        kwargs |= {"id": continued["id"], "resume": "allow"}
        if continued.get("entity"):
            kwargs["entity"] = continued["entity"]
    return kwargs


class MetricsLog:
    """metrics.jsonl in the run dir (always), plus the Accelerate trackers when --report_to asks for them.

    A continued wandb run refuses steps below the one it has reached (`Run.starting_step`: an attempt may have
    logged steps past its last checkpoint); those steps go to metrics.jsonl only. The resumed run recomputes them
    exactly, so the wandb history loses nothing."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, path
        run = wandb_run(accelerator)
        self.first_tracker_step = getattr(run, "starting_step", 0) if run is not None else 0

    def log(self, step: int, values: dict):
        """A row of metrics.jsonl; its numbers go to the trackers at `step` (a tracker's metric is a number: any other
        value stays in metrics.jsonl only)."""
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if step >= self.first_tracker_step:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    def log_files(self, paths, folder: str | None = None):
        """Files the run wrote (a sample grid, fid.json) as artifacts of the trackers that keep files (MLflow), under
        `folder` of the run's artifacts (None: at the top)."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow":
                for path in paths:
                    tracker.log_artifact(str(path), artifact_path=folder)


@dataclass
class LogWindow:
    """The steps since the last log line: their summed loss (only of the steps that updated the model), how many
    there were, how many updated the model, and when the window started."""

    loss: torch.Tensor
    steps: int = 0
    good_steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, skipped: bool):
        if not skipped:
            self.loss += loss
            self.good_steps += 1
        self.steps += 1

    def values(self, accelerator, images_per_step: int) -> dict:
        """The window's mean loss over every process (NaN when no step updated the model) and its throughput."""
        mean_loss = accelerator.reduce(self.loss, "mean").item() / max(self.good_steps, 1)
        return {
            "loss": mean_loss if self.good_steps else math.nan,
            "img_per_s": self.steps * images_per_step / (time.perf_counter() - self.start),
        }

    def reset(self):
        self.loss.zero_()
        self.steps, self.good_steps, self.start = 0, 0, time.perf_counter()


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident memory (GiB; what the OS had to give it) and, on a GPU, torch's peak allocation."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
