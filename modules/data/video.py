"""Moving Fashion-MNIST: clips generated on access, each a pure function of (seed, clip index).

One or more Fashion-MNIST items (the train split for training, the test split for evaluation) move at a constant
integer velocity on a square canvas and bounce off its walls. A clip's frames are (F, C, H, W); its record keeps
the items' classes, top-left positions and velocities per frame, so that metrics can check the motion.

The motion is exact integer arithmetic. Item n's top-left corner p (row, column) lives in [0, room], with
room = canvas - item size, and its velocity v has components of 1 to `max_speed` pixels a frame, never 0:

    q = p[f] + v[f]
    p[f+1], v[f+1] = -q, -v[f]           if q <= 0      (reached or passed the low wall: reflect)
                     2 room - q, -v[f]   if q >= room   (reached or passed the high wall: reflect)
                     q, v[f]             otherwise

so v[f] is always the direction the item leaves frame f in, and positions are the triangle wave of p[0] + f v[0].
Items are composed by the pixel-wise maximum: on the black background an item's pixels are its own exactly, and
where two items overlap the brighter pixel shows, with no clipping.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from modules.config import DataArguments, UserError
from modules.data.images import FASHION_MNIST_CLASSES, TrainData, load_fashion_mnist
from modules.data.order import keyed_generator
from modules.pixels import resize_uint8, to_model_range

FASHION_MNIST_ITEM_SIZE = 28
MOVING_FASHION_MNIST = "moving_fashion_mnist"


@dataclass
class Clips:
    """A batch of generated clips and what made them."""

    frames: torch.Tensor  # uint8 (B, F, C, H, W)
    labels: torch.Tensor  # int64 (B,): the first item's class, the clip's label
    item_labels: torch.Tensor  # int64 (B, n): every item's class
    item_indices: torch.Tensor  # int64 (B, n): the items' indices in their split
    items: torch.Tensor  # uint8 (B, n, S, S): the item images as pasted
    positions: torch.Tensor  # int64 (B, F, n, 2): top-left corner (row, column) in each frame
    velocities: torch.Tensor  # int64 (B, F, n, 2): pixels per frame from frame f to f+1 (before any reflection)


def item_size_for(resolution: int) -> int:
    """The side of an item on a canvas of `resolution`: 28 (Fashion-MNIST's own) from 32 up, else scaled to 7/8 of
    the canvas, so that an item always has room to move."""
    return min(FASHION_MNIST_ITEM_SIZE, resolution * 7 // 8)


def bounce_step(positions: torch.Tensor, velocities: torch.Tensor, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame of motion with reflection off the walls 0 and `room` (the law in the module docstring).

    Exact for integer tensors when every |velocity| <= room, which keeps a reflected position inside [0, room]."""
    q = positions + velocities
    low, high = q <= 0, q >= room
    new_positions = torch.where(low, -q, torch.where(high, 2 * room - q, q))
    new_velocities = torch.where(low | high, -velocities, velocities)
    return new_positions, new_velocities


def motion_paths(start: torch.Tensor, velocity: torch.Tensor, num_frames: int, room: int):
    """Positions and velocities (B, F, n, 2) of items starting at `start` (B, n, 2) with `velocity` (B, n, 2)."""
    positions, velocities = [start], [velocity]
    for _ in range(num_frames - 1):
        p, v = bounce_step(positions[-1], velocities[-1], room)
        positions.append(p)
        velocities.append(v)
    return torch.stack(positions, 1), torch.stack(velocities, 1)  # (B, F, n, 2) each


def render_clips(items: torch.Tensor, positions: torch.Tensor, resolution: int) -> torch.Tensor:
    """Paste items (B, n, S, S) uint8 at top-left `positions` (B, F, n, 2) on black canvases, composed by the
    maximum; returns uint8 (B, F, H, W)."""
    b, f, n, _ = positions.shape
    size = items.shape[-1]
    offsets = torch.arange(size)
    rows = positions[..., 0, None, None] + offsets[:, None]  # (B, F, n, S, 1)
    cols = positions[..., 1, None, None] + offsets[None, :]  # (B, F, n, 1, S)
    frame = torch.arange(b * f).view(b, f, 1, 1, 1)  # (B, F, 1, 1, 1): frame number in the batch
    flat = (frame * resolution + rows) * resolution + cols  # (B, F, n, S, S)
    values = items[:, None].expand(b, f, n, size, size)  # (B, F, n, S, S)
    canvas = torch.zeros(b * f * resolution * resolution, dtype=torch.uint8)
    canvas.scatter_reduce_(0, flat.reshape(-1), values.reshape(-1), "amax")
    return canvas.view(b, f, resolution, resolution)


class MovingFashionMNIST(torch.utils.data.Dataset):
    """`num_clips` clips of `num_items` items from `items` (N, S, S) uint8 with `labels` (N,), generated on access.

    An example is `{"pixel_values": (F, C, H, W) in [-1, 1], "labels", "item_labels", "item_indices",
    "positions", "velocities"}`, as the image datasets of `images.py` give (C, H, W) examples."""

    def __init__(
        self,
        items: torch.Tensor,
        labels: torch.Tensor,
        num_clips: int | None = None,
        num_frames: int = 16,
        resolution: int = 32,
        num_items: int = 1,
        seed: int = 0,
        max_speed: int = 3,
        num_channels: int = 1,
    ):
        size = items.shape[-1]
        room = resolution - size
        if room < 1:
            raise UserError(
                f"moving_fashion_mnist: items of {size}px leave no room to move on a {resolution}px canvas"
            )
        num_clips = len(items) if num_clips is None else num_clips
        counts = {"num_clips": num_clips, "num_frames": num_frames, "num_items": num_items, "max_speed": max_speed}
        for name, value in counts.items():
            if value < 1:
                raise UserError(f"moving_fashion_mnist: {name} must be at least 1, got {value}")
        if num_channels not in (1, 3):
            raise UserError(f"moving_fashion_mnist: num_channels must be 1 or 3, got {num_channels}")
        self.items, self.item_classes, self.num_clips = items, labels, num_clips
        self.num_frames, self.resolution, self.num_items = num_frames, resolution, num_items
        self.seed, self.num_channels, self.room = seed, num_channels, room
        self.max_speed = min(max_speed, room)  # one reflection per frame at most keeps the law exact

    def __len__(self):
        return self.num_clips

    def _draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip `index`'s item indices (n,), start positions (n, 2) and velocities (n, 2), from its own generator."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range (the dataset has {self.num_clips} clips)")
        g = keyed_generator((self.seed, index))  # (seed, index) only: the same clip in any order or process
        n = self.num_items
        item_indices = torch.randint(len(self.items), (n,), generator=g)
        start = torch.randint(self.room + 1, (n, 2), generator=g)
        speed = torch.randint(1, self.max_speed + 1, (n, 2), generator=g)
        velocity = speed * (torch.randint(2, (n, 2), generator=g) * 2 - 1)
        # An item drawn on a wall heading into it leaves the other way, so v[0] too is the direction it leaves in.
        into_wall = ((start == 0) & (velocity < 0)) | ((start == self.room) & (velocity > 0))
        return item_indices, start, torch.where(into_wall, -velocity, velocity)

    def clips(self, indices) -> Clips:
        """The clips at `indices`, generated together."""
        draws = [self._draw(int(i)) for i in indices]
        item_indices, start, velocity = (torch.stack(d) for d in zip(*draws, strict=True))  # (B, n), (B, n, 2) x2
        positions, velocities = motion_paths(start, velocity, self.num_frames, self.room)
        items = self.items[item_indices]  # (B, n, S, S)
        frames = render_clips(items, positions, self.resolution)[:, :, None]  # (B, F, 1, H, W)
        frames = frames.expand(-1, -1, self.num_channels, -1, -1).contiguous()  # (B, F, C, H, W)
        item_labels = self.item_classes[item_indices]
        return Clips(frames, item_labels[:, 0], item_labels, item_indices, items, positions, velocities)

    def __getitems__(self, indices):
        clips = self.clips(indices)
        return {
            "pixel_values": to_model_range(clips.frames),
            "labels": clips.labels,
            "item_labels": clips.item_labels,
            "item_indices": clips.item_indices,
            "positions": clips.positions,
            "velocities": clips.velocities,
        }

    def __getitem__(self, i):
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def uint8_clips(self, n: int) -> torch.Tensor:
        """The first `n` clips as uint8 (n, F, C, H, W), for grids and metrics."""
        return self.clips(range(min(n, self.num_clips))).frames

    uint8_images = uint8_clips  # what held-out data and FID references read, for images and clips alike

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        """Every clip's label (its first item's class), int64 (num_clips,)."""
        return self.item_classes[torch.stack([self._draw(i)[0][0] for i in range(self.num_clips)])]


def load_moving_fashion_mnist(
    split: str = "train",
    resolution: int = 32,
    num_frames: int = 16,
    num_items: int = 1,
    num_clips: int | None = None,
    seed: int = 0,
    max_speed: int = 3,
    num_channels: int = 1,
) -> MovingFashionMNIST:
    """Moving Fashion-MNIST from the `split` of Fashion-MNIST; by default one clip per item of the split."""
    items, labels = load_fashion_mnist(split)  # (N, 28, 28), (N,)
    size = item_size_for(resolution)
    if size < 1:
        raise UserError(f"moving_fashion_mnist: --resolution {resolution} is too small for a moving item")
    if size != items.shape[-1]:
        items = resize_uint8(items[:, None], size)[:, 0]  # (N, S, S)
    return MovingFashionMNIST(
        items, labels, num_clips, num_frames, resolution, num_items, seed, max_speed, num_channels
    )


def moving_fashion_mnist_data(args: DataArguments) -> TrainData:
    """Moving Fashion-MNIST as training data: `--max_train_samples` clips (default: one per item of the split) of
    `--num_frames` frames on a `--resolution` canvas, `--num_moving_items` items each."""
    if args.frame_stride != 1:
        raise UserError(
            f"--frame_stride {args.frame_stride}: {MOVING_FASHION_MNIST} is generated frame by frame (set the clip "
            "length with --num_frames); --frame_stride applies to video files"
        )
    if args.num_moving_items not in (1, 2):
        raise UserError(f"--num_moving_items must be 1 or 2, got {args.num_moving_items}")
    channels = args.num_channels or 1
    dataset = load_moving_fashion_mnist(
        args.dataset_split,
        args.resolution,
        args.num_frames,
        args.num_moving_items,
        num_clips=args.max_train_samples,
        num_channels=channels,
    )
    frames, items = args.num_frames, args.num_moving_items
    key = f"{MOVING_FASHION_MNIST}-{args.dataset_split}-{args.resolution}px-{frames}f-{items}items-{channels}ch"
    return TrainData(dataset, channels, 10, FASHION_MNIST_CLASSES, key, num_frames=frames)
