"""Pixel conversions every layer shares: uint8 images [0, 255] <-> model range [-1, 1], and resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a uint8 batch (N,C,H,W) of square images to (N,C,resolution,resolution), antialiased bilinear."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    out = []
    for chunk in images.split(4096):
        x = F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear", antialias=True)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], the format every metric and image file takes."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
