"""Moving Fashion-MNIST: clips as a function of (seed, index), the exact bounce law, and the motion measures."""

import numpy as np
import pytest
import torch

from modules.config import UserError
from modules.data.images import FASHION_MNIST_DIR, collate_examples, load_fashion_mnist
from modules.data.video import MovingFashionMNIST, item_size_for, load_moving_fashion_mnist
from modules.evaluation.video_metrics import (
    acceleration_ratio,
    frame_difference_ratio,
    intensity_centroid,
    item_centroid_paths,
    mean_frame_difference,
    mean_squared_acceleration,
    track_centroids,
)
from modules.pixels import resize_uint8, to_model_range

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="needs make setup"
)


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def _squares(num_items: int = 12, size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Items that are solid squares of distinct grey levels (60, 75, ...: above the tracker's threshold), with labels
    0..num_items-1."""
    items = torch.arange(4, num_items + 4, dtype=torch.uint8).mul(15).view(-1, 1, 1).expand(-1, size, size)
    return items.contiguous(), torch.arange(num_items)


def _triangle_wave(x: torch.Tensor, room: int) -> torch.Tensor:
    """The position of a point reflecting between 0 and `room` whose unfolded position is `x`."""
    return room - (x.remainder(2 * room) - room).abs()


def _paste(items: np.ndarray, positions: np.ndarray, resolution: int) -> np.ndarray:
    """One clip's frames (F, H, W) pasted item by item with np.maximum: the oracle of the vectorised renderer."""
    size = items.shape[-1]
    frames = np.zeros((len(positions), resolution, resolution), dtype=np.uint8)
    for f, frame_positions in enumerate(positions):
        for item, (row, col) in zip(items, frame_positions, strict=True):
            window = frames[f, row : row + size, col : col + size]
            np.maximum(window, item, out=window)
    return frames


def test_clip_is_a_function_of_seed_and_index_only():
    items, labels = _squares()
    data = MovingFashionMNIST(items, labels, num_clips=50, num_items=2, seed=3)
    batch = data.clips([7, 2, 40])
    fresh = MovingFashionMNIST(items, labels, num_clips=50, num_items=2, seed=3)
    for j, i in reversed(list(enumerate([7, 2, 40]))):  # another order, another dataset object, one at a time
        one = fresh.clips([i])
        for name in ("frames", "labels", "item_labels", "item_indices", "items", "positions", "velocities"):
            assert torch.equal(getattr(one, name)[0], getattr(batch, name)[j]), name
    assert not torch.equal(batch.positions[0], batch.positions[1])
    other_seed = MovingFashionMNIST(items, labels, num_clips=50, num_items=2, seed=4).clips([7, 2, 40])
    assert not torch.equal(other_seed.positions, batch.positions)
    with pytest.raises(IndexError, match="clip 50 out of range"):
        data[50]


@needs_fashion_mnist
@pytest.mark.parametrize("resolution, num_items", [(32, 1), (16, 2), (40, 2)])
def test_motion_obeys_the_bounce_law_exactly(resolution, num_items):
    data = load_moving_fashion_mnist("test", resolution=resolution, num_items=num_items, num_clips=300)
    clips = data.clips(range(300))
    p, v = clips.positions, clips.velocities  # (B, F, n, 2) each
    room = resolution - clips.items.shape[-1]
    assert p.shape == v.shape == (300, 16, num_items, 2) and p.dtype == v.dtype == torch.int64
    assert p.min() >= 0 and p.max() <= room  # inside the canvas
    speed = v.abs()
    assert speed.min() >= 1 and speed.max() <= min(3, room) and torch.equal(speed, speed[:, :1].expand_as(speed))
    frames = torch.arange(16).view(1, -1, 1, 1)
    assert torch.equal(p, _triangle_wave(p[:, :1] + frames * v[:, :1], room))  # the closed form of reflection
    moved = p[:, :-1] + v[:, :-1]
    flipped = v[:, 1:] == -v[:, :-1]
    assert torch.equal(flipped | (v[:, 1:] == v[:, :-1]), torch.ones_like(flipped))  # a velocity only flips
    reached_wall = (moved <= 0) | (moved >= room)
    assert torch.equal(flipped, reached_wall)  # and flips exactly when a step reaches a wall
    assert torch.equal(p[:, 1:][~reached_wall], moved[~reached_wall])  # elsewhere p[f+1] = p[f] + v[f]
    assert flipped.sum() > 100  # bounces happen: the checks above are not vacuous


@needs_fashion_mnist
def test_frames_hold_the_source_items_at_their_positions(test_split):
    images, labels = test_split
    data = load_moving_fashion_mnist("test", resolution=64, num_items=2, num_channels=3)
    assert len(data) == len(images)  # one clip per item of the split by default
    clips = data.clips(range(24))
    assert torch.equal(clips.items, images[clips.item_indices])
    assert torch.equal(clips.item_labels, labels[clips.item_indices]) and torch.equal(
        clips.labels, labels[clips.item_indices[:, 0]]
    )
    assert clips.frames.shape == (24, 16, 3, 64, 64) and clips.frames.dtype == torch.uint8
    assert torch.equal(clips.frames[:, :, 0], clips.frames[:, :, 2])  # grey replicated
    separate = 0
    for b in range(24):
        oracle = _paste(clips.items[b].numpy(), clips.positions[b].numpy(), 64)
        assert np.array_equal(clips.frames[b, :, 0].numpy(), oracle)  # composed by the maximum, nothing else drawn
        for f in range(16):
            (r0, c0), (r1, c1) = clips.positions[b, f].tolist()
            if abs(r0 - r1) >= 28 or abs(c0 - c1) >= 28:  # boxes apart: each item's pixels are its own exactly
                separate += 1
                for (r, c), item in zip(((r0, c0), (r1, c1)), clips.items[b], strict=True):
                    assert torch.equal(clips.frames[b, f, 0, r : r + 28, c : c + 28], item)
    assert separate > 20
    assert torch.equal(data.uint8_clips(3), clips.frames[:3])
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_examples)
    batch = next(iter(loader))  # one index op a batch, as the image datasets are read
    assert torch.equal(batch["pixel_values"], to_model_range(clips.frames[:4]))
    assert torch.equal(batch["positions"], clips.positions[:4]) and torch.equal(batch["labels"], clips.labels[:4])
    example = data[5]
    assert example["pixel_values"].shape == (16, 3, 64, 64) and example["pixel_values"].dtype == torch.float32
    assert torch.equal(example["pixel_values"], to_model_range(data.clips([5]).frames[0]))
    assert example["labels"].ndim == 0 and example["positions"].shape == (16, 2, 2)


def test_train_and_test_splits_draw_from_their_own_images(monkeypatch):
    squares, labels = _squares(size=28)
    sources = {"train": (squares, labels), "test": (squares.flip(0).contiguous(), labels.flip(0).contiguous())}
    asked = []
    monkeypatch.setattr("modules.data.video.load_fashion_mnist", lambda split: asked.append(split) or sources[split])
    for split, (images, split_labels) in sources.items():
        clips = load_moving_fashion_mnist(split, num_clips=20).clips(range(20))
        assert torch.equal(clips.items[:, 0], images[clips.item_indices[:, 0]])
        assert torch.equal(clips.labels, split_labels[clips.item_indices[:, 0]])
        assert torch.equal(clips.frames.amax((1, 2, 3, 4)), images[clips.item_indices[:, 0]].amax((1, 2)))
    assert asked == ["train", "test"]


def test_small_canvas_scales_items_and_bad_settings_are_named(monkeypatch):
    items, labels = _squares(size=28)
    monkeypatch.setattr("modules.data.video.load_fashion_mnist", lambda split: (items, labels))
    assert [item_size_for(r) for r in (64, 32, 16, 8)] == [28, 28, 14, 7]
    small = load_moving_fashion_mnist(resolution=16)
    assert torch.equal(small.items, resize_uint8(items[:, None], 14)[:, 0]) and small.max_speed == 2
    assert small.clips([0]).frames.shape == (1, 16, 1, 16, 16)
    with pytest.raises(UserError, match="no room to move on a 28px canvas"):
        MovingFashionMNIST(items, labels, resolution=28)
    with pytest.raises(UserError, match="num_frames must be at least 1, got 0"):
        MovingFashionMNIST(items, labels, num_frames=0)
    with pytest.raises(UserError, match="num_channels must be 1 or 3, got 2"):
        MovingFashionMNIST(items, labels, num_channels=2)
    with pytest.raises(UserError, match="num_clips must be at least 1, got 0"):
        MovingFashionMNIST(items, labels, num_clips=0)


@needs_fashion_mnist
def test_tracker_finds_a_single_item_and_acceleration_only_at_bounces():
    data = load_moving_fashion_mnist("test", num_clips=64)
    clips = data.clips(range(64))
    true_paths = item_centroid_paths(clips.positions, clips.items)  # (B, F, 1, 2)
    assert torch.allclose(track_centroids(clips.frames), true_paths, atol=1e-9, rtol=0)  # exact, but for rounding
    model_range = to_model_range(clips.frames)  # float32 [-1, 1]: the same up to its rounding
    assert torch.allclose(track_centroids(model_range), true_paths, atol=1e-4, rtol=0)
    p = clips.positions  # integers, so the second differences below are exact
    acceleration = p[:, 2:] - 2 * p[:, 1:-1] + p[:, :-2]  # (B, F-2, 1, 2)
    changed = clips.velocities[:, 1:] != clips.velocities[:, :-1]  # (B, F-1, 1, 2): a bounce in the step to f+1
    near_bounce = changed[:, 1:] | changed[:, :-1]  # a bounce in the step into frame f or out of it
    assert (acceleration != 0).sum() > 50 and not (acceleration[~near_bounce] != 0).any()
    expected = acceleration.double().pow(2).sum(-1).mean((1, 2))
    assert torch.allclose(mean_squared_acceleration(true_paths), expected, atol=1e-9, rtol=0)
    assert torch.allclose(mean_squared_acceleration(track_centroids(clips.frames)), expected, atol=1e-9, rtol=0)
    assert acceleration_ratio(clips.frames, clips.frames) == pytest.approx(1)
    still = clips.frames[:, [0] * 16]  # every frame the first: no motion at all
    assert acceleration_ratio(still, clips.frames) == 0 and frame_difference_ratio(still, clips.frames) == 0


def test_tracker_follows_separate_items():
    items, labels = _squares(size=5)
    items = items.clone()
    items[:, 0, :2] = 0  # not symmetric: the centroid is not the square's centre
    data = MovingFashionMNIST(items, labels, num_clips=200, resolution=40, num_items=2)
    clips = data.clips(range(200))
    gap = (clips.positions[:, :, 0] - clips.positions[:, :, 1]).abs().amax(-1)  # (B, F): the larger axis gap
    apart = (gap >= 8).all(1) & (clips.item_indices[:, 0] != clips.item_indices[:, 1])
    assert apart.sum() >= 10
    true_paths = item_centroid_paths(clips.positions[apart], clips.items[apart])
    tracked = track_centroids(clips.frames[apart], num_items=2)
    error = torch.minimum(
        (tracked - true_paths).abs().amax((1, 2, 3)), (tracked - true_paths.flip(2)).abs().amax((1, 2, 3))
    )
    assert error.max() < 1e-9


def test_acceleration_and_frame_difference_closed_forms():
    line = torch.stack([torch.arange(6.0), 2 * torch.arange(6.0)], -1).view(1, 6, 1, 2)  # constant velocity
    assert mean_squared_acceleration(line).item() == 0
    kink = line.clone()
    kink[0, 3:, 0, 0] = 5 - torch.arange(
        3, 6.0
    )  # rows 0 1 2 2 1 0, reflected at 2.5: second differences -1 at f = 2, 3
    assert mean_squared_acceleration(kink).item() == pytest.approx((1 + 1) / 4)
    frames = torch.zeros(2, 3, 1, 2, 2, dtype=torch.uint8)
    frames[:, 1, 0, 0, 0] = 255  # one pixel on in frame 1: |diff| sums to 2 pixels of 1.0 over 2 * 4 values
    assert torch.allclose(mean_frame_difference(frames), torch.full((2,), 2 / 8, dtype=torch.float64))
    assert frame_difference_ratio(frames[:, [0, 0, 0]], frames) == 0
    assert frame_difference_ratio(frames, frames) == 1
    square = torch.zeros(5, 5)
    square[1:3, 2:4] = 1
    assert intensity_centroid(square).tolist() == [1.5, 2.5]
