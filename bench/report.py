"""What every benchmark prints: the setting it ran in, markdown tables, peak memory, and its goals, met or missed.

A goal is a ratio measured against a baseline in the same run; `report_goals` exits with status 1 when one is
missed (unless the script was asked only to report).
"""

from __future__ import annotations

import datetime
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.records import command_line


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def print_setting(script: str, argv, device: torch.device) -> None:
    """Command line, date, torch version, device and thread count, as the first lines of the report."""
    print(f"`{command_line(f'bench/{Path(script).name}', argv)}`\n")
    print(
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | torch {torch.__version__} | "
        f"{device.type}: {device_name(device)} | threads: {torch.get_num_threads()}\n"
    )


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset on CUDA; else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux


def peak_memory_line(device: torch.device) -> str:
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    return f"peak memory ({what}): {peak_memory_mib(device):.0f} MiB"


@dataclass
class Goal:
    """A measured ratio and the bound it must meet: value >= target (`at_least`) or value < target."""

    name: str
    value: float
    target: float
    at_least: bool = True
    percent: bool = False

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.at_least else self.value < self.target

    def cells(self) -> list[str]:
        show = (lambda v: f"{100 * v:.1f} %") if self.percent else (lambda v: f"{v:.3f}")
        bound = f"{'>=' if self.at_least else '<'} {show(self.target)}"
        return [self.name, show(self.value), bound, "yes" if self.met else "**no**"]


def report_goals(goals: list[Goal], no_goals: bool) -> bool:
    """Print each goal and whether it is met; exit with status 1 when one is missed, unless `no_goals`."""
    print(markdown_table(["goal", "measured", "target", "met"], [goal.cells() for goal in goals]))
    met = all(goal.met for goal in goals)
    if not met and not no_goals:
        print("\na goal was missed (--no_goals only reports)")
        raise SystemExit(1)
    return met


def finish(headers: list[str], rows: list[list], device: torch.device, goals: list[Goal], no_goals: bool) -> bool:
    """Print the table, the peak memory and the goals; exits 1 on a missed goal unless `no_goals`."""
    print(markdown_table(headers, rows) + "\n")
    print(peak_memory_line(device) + "\n")
    return report_goals(goals, no_goals)
