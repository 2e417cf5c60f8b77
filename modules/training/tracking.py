"""What a run logs: metrics.jsonl in the run dir (always) and Accelerate's trackers (--report_to), the window of
steps between two log lines, and the process's peak memory."""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

TRACKERS = ("none", "tensorboard", "wandb", "all")


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
    """The Accelerate trackers for --report_to, warning (and carrying on) when one cannot work as asked:
    wandb not installed is dropped; wandb without a login logs offline into the run dir, to `wandb sync` later."""
    wanted = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    trackers = []
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            warnings.warn(
                f"--report_to {report_to}: {name} is not installed (pip install {name}); "
                "not logging to it (metrics.jsonl is still written)",
                stacklevel=2,
            )
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
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if step >= self.first_tracker_step:
            self.accelerator.log(values, step=step)


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
