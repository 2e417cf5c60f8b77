"""The size table of every preset, from `train_cfm.py --dry_run` (meta device: instant, no data, no memory).

    python bench/model_sizes.py

UNets at the CIFAR-10 shape (3x32x32, unconditional, batch 128, fp32); DiTs with patch 2 on ImageNet-256 latents
(4x32x32, 1000 classes, batch 32, bf16). Prints a markdown table: parameters, training FLOPs per image (forward and
backward) and the estimated peak memory per process (see modules/sizing.py for what it counts).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_cfm
from modules.networks.dit import DIT_PRESETS
from modules.networks.unet import UNET_PRESETS

UNET_SETTING = (
    "3x32x32 (CIFAR-10 shape), unconditional",
    ["--num_channels", "3", "--resolution", "32", "--class_conditional", "false", "--train_batch_size", "128"],
)
DIT_SETTING = (
    "4x32x32 latents (ImageNet-256), 1000 classes",
    ["--patch_size", "2", "--resolution", "256", "--train_batch_size", "32", "--mixed_precision", "bf16"],
)


def size(model: str, flags: list[str], missing: Path) -> dict:
    """The dry run's JSON line; the data is a path that does not exist, so its shape comes from the flags."""
    source = ["--latent_dataset", str(missing)] if model in DIT_PRESETS else ["--dataset_name", str(missing)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_cfm.main(["--dry_run", "--model", model, *source, *flags])
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main():
    missing = Path(__file__).resolve().parent / "no-such-data"
    print("| preset | input | parameters | training GFLOPs / image | est. peak memory per process |")
    print("|---|---|---|---|---|")
    for presets, (shape, flags), suffix in ((UNET_PRESETS, UNET_SETTING, ""), (DIT_PRESETS, DIT_SETTING, "/2")):
        for model in presets:
            r = size(model, flags, missing)
            precision = "fp32" if r["precision"] == "no" else r["precision"]
            memory = f"{r['estimated_peak_gib']:.1f} GiB (batch {r['batch_per_process']}, {precision})"
            gflops = r["train_gflops_per_image"]
            print(f"| `{model}{suffix}` | {shape} | {r['parameters'] / 1e6:.2f}M | {gflops:.1f} | {memory} |")


if __name__ == "__main__":
    main()
