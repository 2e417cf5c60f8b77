"""Images out: grids of samples."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def image_grid(images_uint8: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile (N,C,H,W) uint8 images into one (C', H', W') uint8 image, `nrow` images per row."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images_uint8)))
    grid = make_grid(images_uint8, nrow=nrow, padding=padding, pad_value=255)
    return grid[:1] if images_uint8.shape[1] == 1 else grid  # make_grid repeats grey to RGB; keep one channel


def save_image(image_uint8: torch.Tensor, path: str | Path):
    """Write a (C,H,W) uint8 image as PNG, via a temporary file so a reader never sees half an image."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image_uint8.permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_image_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None):
    save_image(image_grid(images_uint8, nrow), path)
