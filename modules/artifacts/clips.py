"""Clips out: a still grid of every frame (clips in rows, frames in columns), and the clips playing side by side as
a looping GIF and as an MP4 video. Clips are uint8 (N, F, C, H, W) with C = 1 or 3; every file is written whole
(temporary name, then rename) as `save_image` writes images."""

from __future__ import annotations

from pathlib import Path

import torch

from modules.artifacts.visualize import (
    MIN_GIF_CELL_PX,
    enlarge,
    image_grid,
    save_image,
    save_image_grid,
    to_hwc,
    write_gif_frames,
)
from modules.files import write_atomically

MP4_CRF = 18  # libx264's constant rate factor: 18 is visually lossless for these flat, high-contrast frames


def _check_clips(clips_uint8: torch.Tensor) -> torch.Tensor:
    clips_uint8 = torch.as_tensor(clips_uint8)
    if clips_uint8.dtype != torch.uint8 or clips_uint8.ndim != 5 or clips_uint8.shape[2] not in (1, 3):
        raise ValueError(
            f"clips must be uint8 (N, F, C, H, W) with C = 1 or 3, got {clips_uint8.dtype} {tuple(clips_uint8.shape)}"
        )
    if 0 in clips_uint8.shape:
        raise ValueError(f"no clips to show: got shape {tuple(clips_uint8.shape)}")
    return clips_uint8.cpu()


def clip_grid(clips_uint8: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """Every frame of clips (N, F, C, H, W) as one uint8 (C, H', W') image: clip n in row n, frame f in column f."""
    clips_uint8 = _check_clips(clips_uint8)
    return image_grid(clips_uint8.flatten(0, 1), nrow=clips_uint8.shape[1], padding=padding)  # (N * F, C, H, W)


def save_clip_grid(clips_uint8: torch.Tensor, path: str | Path):
    """`clip_grid` as a PNG."""
    save_image(clip_grid(clips_uint8), path)


def animation_frames(clips_uint8: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """The clips playing side by side, uint8 (F, C, H', W'): frame f is the `image_grid` of every clip's frame f,
    `nrow` clips per row, small frames enlarged (nearest neighbour) to MIN_GIF_CELL_PX as the denoising GIFs are."""
    clips_uint8 = enlarge(_check_clips(clips_uint8), MIN_GIF_CELL_PX)
    return torch.stack([image_grid(frame, nrow) for frame in clips_uint8.transpose(0, 1)])  # (F, N, C, H, W) in


def save_clips_gif(clips_uint8: torch.Tensor, path: str | Path, nrow: int | None = None, fps: int = 8):
    """`animation_frames` as a looping GIF at `fps` frames a second (GIF counts time in 10 ms: 8 fps plays at
    8.3). Pillow merges identical consecutive frames into one longer frame, so a still clip keeps its timing."""
    from PIL import Image

    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    images = [Image.fromarray(to_hwc(frame)) for frame in animation_frames(clips_uint8, nrow)]
    write_gif_frames(images, path, [round(1000 / fps)] * len(images))


def _even_rgb(frames_uint8: torch.Tensor) -> torch.Tensor:
    """(F, C, H, W) uint8 -> (F, H', W', 3), grey repeated to RGB and padded white (right, bottom) to even sides, as
    yuv420p's half-resolution chroma needs."""
    frames = frames_uint8.expand(-1, 3, -1, -1)
    height, width = frames.shape[-2:]
    padding = (0, width % 2, 0, height % 2)  # (left, right, top, bottom)
    return torch.nn.functional.pad(frames, padding, value=255).permute(0, 2, 3, 1).contiguous()


def save_clips_mp4(clips_uint8: torch.Tensor, path: str | Path, nrow: int | None = None, fps: int = 8):
    """`animation_frames` as an H.264 MP4 (libx264, yuv420p, which every player reads) at `fps` frames a second.

    Lossy: chroma at half resolution, and grey levels within a few units of the frames'."""
    import av

    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    frames = _even_rgb(animation_frames(clips_uint8, nrow)).numpy()  # (F, H, W, 3)

    def encode(file):
        with av.open(file, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(MP4_CRF)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the frames the encoder still holds

    write_atomically(path, encode)


def write_clips(clips_uint8: torch.Tensor, out_base: str | Path, nrow: int | None = None) -> dict[str, Path]:
    """`<out_base>.png` (`save_clip_grid`), `<out_base>.gif` and `<out_base>.mp4` (the clips playing side by side,
    `nrow` per row); returns their paths by suffix: {"png": ..., "gif": ..., "mp4": ...}."""
    out_base = Path(out_base)
    paths = {suffix: out_base.parent / f"{out_base.name}.{suffix}" for suffix in ("png", "gif", "mp4")}
    save_clip_grid(clips_uint8, paths["png"])
    save_clips_gif(clips_uint8, paths["gif"], nrow)
    save_clips_mp4(clips_uint8, paths["mp4"], nrow)
    return paths


def save_samples(samples_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> list[Path]:
    """A sample grid at `path` (.png): of images (N, C, H, W), `nrow` per row; of clips (N, F, C, H, W), the frame
    grid, with the GIF and MP4 beside it (`write_clips`). Returns the files written."""
    path = Path(path)
    if samples_uint8.ndim == 5:
        return list(write_clips(samples_uint8, path.with_suffix(""), nrow).values())
    save_image_grid(samples_uint8, path, nrow=nrow)
    return [path]
