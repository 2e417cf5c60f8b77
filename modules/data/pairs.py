"""Reflow pairs: what a trained model's sampler made from each noise, for training a student on the straight lines
between them (2-rectified flow, Liu et al. 2022). `sample.py --output_pairs` writes them; `--pairs_dataset` trains
on them.

A pairs dataset is a directory (or a Hub dataset repo) that `datasets.load_dataset` also reads:

    data/train-00000-of-00003.parquet  rows in image order: noise, sample (float32, shaped like the model's input:
                                       (C, H, W), or (F, C, H, W) for clips; pixels in [-1, 1], or the normalised
                                       latents of a latent model, not decoded); label (int) of a class-conditional
                                       teacher, caption (str) of a text-conditional one
    README.md                          dataset card
    pairs.json                         the teacher, its sampler, steps, guidance and seed, the shape, the
                                       conditioning, the latent record that decodes samples and the arguments that
                                       name the teacher's training images (for FID); written last: marks the
                                       pairs complete

Row i is image i of `sample.py --model TEACHER --seed SEED` with the same sampler settings: its noise is the noise
sample.py draws for image i, its sample what the teacher makes of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.config import UserError
from modules.data.images import short_digest
from modules.data.latents import LatentDataset, local_dataset_dir, read_shard
from modules.data.shards import check_shard, read_metadata

METADATA_FILE = "pairs.json"
PAIR_COLUMNS = ("noise", "sample")
BATCH_KEYS = {"noise": "noise", "sample": "x0"}  # parquet column -> batch key
CONDITION_COLUMNS = {"class": "label", "text": "caption", "none": None}  # pairs.json's conditioning -> its column
REQUIRED_KEYS = ("teacher", "shape", "image_resolution", "num_pairs", "shards", "conditioning", "num_classes")


@dataclass
class PairsData:
    """A pairs dataset opened for training: the counterpart of modules.data.TrainData and LatentData. Its batches
    hold "x0" (the teacher's sample), "noise" (what the teacher made it from) and "labels"."""

    dataset: LatentDataset
    num_channels: int
    resolution: int  # the samples' height = width (of latents, for a latent teacher)
    num_classes: int  # 0 unless the teacher is class-conditional
    class_names: tuple[str, ...] | None
    key: str  # names the data for caches; includes a digest of pairs.json
    metadata: dict  # the whole pairs.json
    captions: list[str] | None = None  # by index, of a text-conditional teacher
    num_frames: int = 0  # frames per clip of clip pairs; 0 for images


def load_pairs_data(
    path_or_id: str, max_samples: int | None = None, validation_samples: int = 0, revision: str | None = None
) -> tuple[PairsData, PairsData | None]:
    """(the pairs to train on, the pairs held out for the validation loss or None), from a complete pairs dataset (a
    local directory or a Hub dataset id); `UserError` on bad input.

    The held-out pairs are the last `validation_samples` (clips of F frames count F each), at most a tenth of the
    dataset; training takes the first `max_samples` of the others."""
    root = local_dataset_dir(path_or_id, revision, "pairs dataset", "sample.py --output_pairs")
    meta_path = root / METADATA_FILE
    text, meta = _read_metadata(path_or_id, meta_path)
    shape, total = tuple(meta["shape"]), meta["num_pairs"]
    frames = shape[0] if len(shape) == 4 else 0
    held = min(max(validation_samples // (frames or 1), 1), total // 10) if validation_samples > 0 else 0
    n = min(max_samples or total - held, total - held)
    if n < 1:
        raise UserError(f"pairs dataset '{path_or_id}' holds no pairs to train on ({total} in all, {held} held out)")
    columns = _read_columns(root, meta, meta_path)
    name = root.name if Path(path_or_id).exists() else path_or_id.replace("/", "--")
    class_names = tuple(meta["class_names"]) if meta.get("class_names") else None

    def part(rows: slice, key: str) -> PairsData:
        arrays = {c: torch.from_numpy(np.ascontiguousarray(columns[c][rows])) for c in PAIR_COLUMNS}
        labels = torch.from_numpy(columns["label"][rows].astype(np.int64)) if "label" in columns else None
        return PairsData(
            dataset=LatentDataset(arrays, len(arrays["sample"]), labels, BATCH_KEYS),
            num_channels=shape[-3],
            resolution=shape[-1],
            num_classes=int(meta["num_classes"]) if labels is not None else 0,
            class_names=class_names,
            key=f"pairs-{name}-{key}-{short_digest(text)}",
            metadata=meta,
            captions=[str(c) for c in columns["caption"][rows]] if "caption" in columns else None,
            num_frames=frames,
        )

    return part(slice(0, n), str(n)), part(slice(total - held, total), f"held-out-{held}") if held else None


def _read_metadata(path_or_id: str, meta_path: Path) -> tuple[str, dict]:
    """pairs.json as text and as a dict, checked for the keys and values training needs."""
    rerun = "making it did not finish; rerun sample.py --output_pairs"
    text, meta = read_metadata(path_or_id, meta_path, REQUIRED_KEYS, "pairs dataset", rerun)
    if len(meta["shape"]) not in (3, 4):
        raise UserError(f"{meta_path}: shape {meta['shape']} should be [C, H, W], or [F, C, H, W] for clips")
    if meta["conditioning"] not in CONDITION_COLUMNS:
        raise UserError(
            f"{meta_path}: conditioning {meta['conditioning']!r} is not one of {', '.join(CONDITION_COLUMNS)}"
        )
    return text, meta


def _read_columns(root: Path, meta: dict, meta_path: Path) -> dict[str, np.ndarray]:
    """Every row of the shards into memory (noise, sample float32; label; caption), after checking that each shard
    is there with the columns pairs.json's conditioning needs, and that together they hold what it says."""
    condition = CONDITION_COLUMNS[meta["conditioning"]]
    wanted, shape, parts = [*PAIR_COLUMNS, *([condition] if condition else [])], tuple(meta["shape"]), []
    for name in meta["shards"]:
        path = root / name
        check_shard(path, meta_path, wanted)
        shard = read_shard(path, wanted, arrays=PAIR_COLUMNS)
        for column in PAIR_COLUMNS:
            if shard[column].shape[1:] != shape:
                raise UserError(
                    f"{path}: column '{column}' holds arrays of shape {shard[column].shape[1:]}, but {meta_path} says "
                    f"{shape}"
                )
        parts.append(shard)
    total = sum(len(p["sample"]) for p in parts)
    if not parts or total != meta["num_pairs"]:
        raise UserError(f"{root}: the shards hold {total} pairs, but {meta_path} says {meta['num_pairs']}")
    return {c: np.concatenate([p[c] for p in parts]) for c in wanted}
