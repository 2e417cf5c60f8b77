"""Images out: grids of samples, and figures of the denoising path a sampler takes (see DenoisingRecorder)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modules.files import write_atomically
from modules.pixels import to_uint8


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
    image = Image.fromarray(to_hwc(image_uint8))
    write_atomically(path, lambda f: image.save(f, format="PNG"))


def save_image_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None):
    save_image(image_grid(images_uint8, nrow), path)


# --- Denoising paths: what a sampler does, step by step -------------------------------------------------------------

# Small images are enlarged (nearest neighbour) to at least this many pixels, so labels fit and pixels show.
MIN_CELL_PX, MIN_GIF_CELL_PX = 48, 96
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


class DenoisingRecorder:
    """A sampler callback that keeps, at every step, t, x_t and x0_pred of the first `max_samples` samples.

    Pass it as `callback=recorder` to `objective.sample` (or to `generate_images`). It records one sampling loop: when
    the step index goes back to 0 a new loop has begun (the next batch of `generate_images`), which it ignores, so
    its samples are images 0..max_samples-1 of the run. `clear()` makes it ready for another loop."""

    def __init__(self, max_samples: int = 8):
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self.max_samples = max_samples
        self.clear()

    def clear(self):
        self.steps: list[int] = []
        self.ts: list[float] = []
        self._x_t: list[torch.Tensor] = []
        self._x0_pred: list[torch.Tensor] = []

    def __call__(self, step_index: int, t, x_t: torch.Tensor, x0_pred: torch.Tensor):
        if self.steps and step_index <= self.steps[-1]:
            return  # a later sampling loop
        if x_t.ndim == 5:  # clips (B, F, C, H, W): the path of their first frames
            x_t, x0_pred = x_t[:, 0], x0_pred[:, 0]
        self.steps.append(int(step_index))
        self.ts.append(float(t))
        self._x_t.append(x_t[: self.max_samples].detach().float().cpu().clone())
        self._x0_pred.append(x0_pred[: self.max_samples].detach().float().cpu().clone())

    @property
    def num_steps(self) -> int:
        return len(self.steps)  # not __len__: samplers test `if callback:`, and an empty recorder must still be truthy

    @property
    def x_t(self) -> torch.Tensor:
        """(S, N, C, H, W): the state the sampler held before each of its S steps."""
        return torch.stack(self._check()._x_t)

    @property
    def x0_pred(self) -> torch.Tensor:
        """(S, N, C, H, W): the model's estimate of the data at each step. The last one is the sampler's output: every
        sampler here lands its final step on its x0 estimate (up to a scheduler's own clipping)."""
        return torch.stack(self._check()._x0_pred)

    def decode(self, decode) -> DenoisingRecorder:
        """Map every recorded x_t and x0_pred through `decode` (e.g. a VAE's decoder for latent models), in place."""
        with torch.no_grad():
            self._x_t = [decode(x).float().cpu() for x in self._x_t]
            self._x0_pred = [decode(x).float().cpu() for x in self._x0_pred]
        return self

    def _check(self) -> DenoisingRecorder:
        if not self.steps:
            raise ValueError("the DenoisingRecorder holds no steps: pass it as `callback=recorder` to a sampler first")
        return self


def _font(size: int | None = None):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size) if size else ImageFont.load_default()
    except TypeError:  # Pillow < 10.1: one bitmap font, one size
        return ImageFont.load_default()


def enlarge(images_uint8: torch.Tensor, min_px: int = MIN_CELL_PX) -> torch.Tensor:
    """Nearest-neighbour upscale of (..., H, W) by the smallest integer factor that makes H and W >= min_px."""
    scale = max(1, math.ceil(min_px / min(images_uint8.shape[-2:])))
    return images_uint8.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _add_labels(
    grid_uint8: torch.Tensor, top: list[str], centres_x: list[float], left=(), centres_y=()
) -> torch.Tensor:
    """White margins on top of (and, given `left` labels, left of) a (C,H,W) uint8 image, labels centred on their
    column's x or row's y (coordinates in the unlabelled image)."""
    from PIL import Image, ImageDraw

    font = _font()
    band_h = max(font.getbbox(text)[3] for text in top) + 4
    band_w = max((font.getbbox(text)[2] + 6 for text in left), default=0)
    channels, height, width = grid_uint8.shape
    canvas = Image.new("L" if channels == 1 else "RGB", (band_w + width, band_h + height), "white")
    canvas.paste(Image.fromarray(to_hwc(grid_uint8)), (band_w, band_h))
    draw = ImageDraw.Draw(canvas)
    for text, x in zip(top, centres_x, strict=True):
        draw.text((band_w + x, 2), text, fill="black", font=font, anchor="mt")
    for text, y in zip(left, centres_y, strict=True):
        draw.text((band_w - 3, band_h + y), text, fill="black", font=font, anchor="rm")
    return _from_pil(canvas, channels)


def to_hwc(image_uint8: torch.Tensor):
    array = image_uint8.permute(1, 2, 0).cpu().numpy()  # (H, W, C)
    return array[:, :, 0] if array.shape[2] == 1 else array


def _from_pil(image, channels: int) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.array(image))
    return array[None] if channels == 1 else array.permute(2, 0, 1).contiguous()  # (C, H, W)


def path_columns(num_steps: int, num_columns: int) -> list[int]:
    """`num_columns` step indices evenly spaced over 0..num_steps-1, first and last included, no repeats."""
    count = max(2, min(num_columns, num_steps))
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def denoising_path_grid(recorder: DenoisingRecorder, num_columns: int = 8, with_x_t: bool = True) -> torch.Tensor:
    """The denoising path as a uint8 (C,H,W) image: one column per chosen step (evenly spaced, first and last
    included) labelled with its t, one row per sample showing x0_pred (clamped to [-1, 1]).

    With `with_x_t`, each sample's x0_pred row has the state x_t just above it: the pair shows what the sampler holds
    and what the model makes of it. The last x0_pred column is the sampler's output."""

    columns = path_columns(recorder.num_steps, num_columns)
    rows = [recorder.x_t[columns], recorder.x0_pred[columns]] if with_x_t else [recorder.x0_pred[columns]]
    cells = torch.stack(rows).permute(2, 0, 1, 3, 4, 5)  # (R, K, N, C, H, W) -> (N, R, K, ...): sample, kind, column
    cells = enlarge(to_uint8(cells.flatten(0, 2)))  # (N * R * K, C, H', W'), row-major
    grid = image_grid(cells, nrow=len(columns))
    height, width = cells.shape[-2:]  # make_grid puts cell k of a row at padding + k * (width + padding)
    kinds = ["x_t", "x0_pred"] if with_x_t else ["x0_pred"]
    row_labels = kinds * recorder.x_t.shape[1]
    return _add_labels(
        grid,
        [f"t={recorder.ts[k]:.2f}" for k in columns],
        [2 + k * (width + 2) + width / 2 for k in range(len(columns))],
        row_labels,
        [2 + r * (height + 2) + height / 2 for r in range(len(row_labels))],
    )


def trajectory_pca_plot(recorder: DenoisingRecorder, size: int = 512) -> torch.Tensor:
    """Each sample's path x_t, from noise to its final x0_pred, projected on the first two principal components of all
    the recorded points together, as a uint8 (3, size, size) plot. Hollow circle: start (noise); filled: end (data)."""
    from PIL import Image, ImageDraw

    paths = torch.cat([recorder.x_t, recorder.x0_pred[-1:]]).transpose(0, 1).flatten(2)  # (N, S + 1, D)
    points = paths.flatten(0, 1).double()  # (N * (S + 1), D)
    centred = points - points.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = torch.zeros(points.shape[1], 2, dtype=points.dtype)
    components[:, : min(2, vh.shape[0])] = vh[:2].T
    xy = (centred @ components).view(*paths.shape[:2], 2)  # (N, S + 1, 2)
    variance = torch.cat([singular.pow(2), singular.new_zeros(2)])  # padded: fewer than two components is possible
    explained = variance[:2] / variance.sum().clamp_min(1e-300)

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    title_font, font = _font(14), _font()
    left, top, right, bottom = 28, 30, size - 12, size - 44
    draw.text((size / 2, 8), "x_t trajectories, PCA", fill="black", font=title_font, anchor="mt")
    draw.rectangle((left, top, right, bottom), outline="black")
    inset, r = 12, 4  # inset keeps the markers inside the frame; r: marker radius
    low, high = xy.flatten(0, 1).min(0).values, xy.flatten(0, 1).max(0).values
    origin = torch.tensor([left + inset, bottom - inset], dtype=xy.dtype)
    extent = torch.tensor([right - left - 2 * inset, top - bottom + 2 * inset], dtype=xy.dtype)  # y grows downwards
    span = high - low
    unit = torch.where(span > 1e-12, (xy - low) / span.clamp_min(1e-12), 0.5)  # a flat axis sits in the middle
    pixels = origin + unit * extent  # (N, S + 1, 2)
    for i, path in enumerate(pixels.tolist()):
        colour = PALETTE[i % len(PALETTE)]
        draw.line([tuple(p) for p in path], fill=colour, width=2, joint="curve")
        (x0, y0), (x1, y1) = path[0], path[-1]
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=colour, fill="white", width=2)
        draw.ellipse((x1 - r, y1 - r, x1 + r, y1 + r), fill=colour)

    # The key for the markers, centred below the PC1 label: hollow circle = start (noise), filled = end (data).
    key_x, key_y = (left + right) / 2 - 60, bottom + 32
    draw.ellipse((key_x - r, key_y - r, key_x + r, key_y + r), outline="black", width=2)
    draw.text((key_x + 8, key_y), "noise (t=1)", fill="black", font=font, anchor="lm")
    draw.ellipse((key_x + 70 - r, key_y - r, key_x + 70 + r, key_y + r), fill="black")
    draw.text((key_x + 78, key_y), "data (t=0)", fill="black", font=font, anchor="lm")

    pc1, pc2 = (f"PC{k + 1} ({float(explained[k]):.0%} of variance)" for k in (0, 1))
    draw.text(((left + right) / 2, bottom + 6), pc1, fill="black", font=font, anchor="mt")
    box = font.getbbox(pc2)
    vertical = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(vertical).text((1, 1), pc2, fill="black", font=font)
    vertical = vertical.rotate(90, expand=True)  # PC2 reads bottom to top along its axis
    image.paste(vertical, (left - vertical.width - 6, int((top + bottom - vertical.height) / 2)))
    return _from_pil(image, 3)


def save_gif(
    recorder: DenoisingRecorder,
    path: str | Path,
    which: str = "x0_pred",
    nrow: int | None = None,
    duration_ms: int = 120,
):
    """Write the samples' grid over the steps as a looping GIF, labelled with t, atomically like `save_image`.

    `which="x0_pred"`: one frame per step. `which="x_t"`: one per step, then the output (t=0). The last frame is held
    for a second."""
    from PIL import Image

    if which not in ("x0_pred", "x_t"):
        raise ValueError(f"save_gif shows 'x0_pred' or 'x_t', not '{which}'")
    if which == "x0_pred":
        frames, ts = recorder.x0_pred, recorder.ts
    else:  # end on the output, where x_t arrives after the last step
        frames, ts = torch.cat([recorder.x_t, recorder.x0_pred[-1:]]), [*recorder.ts, 0.0]
    images = []
    for x, t in zip(frames, ts, strict=True):
        grid = image_grid(enlarge(to_uint8(x), MIN_GIF_CELL_PX), nrow)
        images.append(Image.fromarray(to_hwc(_add_labels(grid, [f"{which}  t={t:.2f}"], [grid.shape[-1] / 2]))))
    write_gif_frames(images, path, [duration_ms] * (len(images) - 1) + [max(duration_ms, 1000)])


def write_gif_frames(images: list, path: str | Path, durations_ms: list[int]):
    """Write PIL images as a looping GIF showing image i for durations_ms[i], atomically like `save_image`."""
    write_atomically(
        path,
        lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=durations_ms, loop=0
        ),
    )


def write_denoising_figures(recorder: DenoisingRecorder, out_dir: str | Path, prefix: str) -> dict[str, Path]:
    """`<prefix>_denoising.png` (denoising_path_grid), `<prefix>_trajectories.png` (trajectory_pca_plot) and
    `<prefix>_denoising.gif` (save_gif of x0_pred) in `out_dir`; returns their paths by kind."""
    out_dir = Path(out_dir)
    paths = {
        "denoising": out_dir / f"{prefix}_denoising.png",
        "trajectories": out_dir / f"{prefix}_trajectories.png",
        "animation": out_dir / f"{prefix}_denoising.gif",
    }
    save_image(denoising_path_grid(recorder), paths["denoising"])
    save_image(trajectory_pca_plot(recorder), paths["trajectories"])
    save_gif(recorder, paths["animation"])
    return paths
