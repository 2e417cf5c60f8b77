"""The building blocks of the metrics of clips: centroid paths, their acceleration, frame differences, and whether
the item in a clip stays the same class from frame to frame.

The same measures apply to real and generated clips: a real clip's item paths are known (its recorded positions plus
each item's own centroid), and the centroid tracker finds them from the pixels alone, which is all a generated clip
has. Clips are (B, F, C, H, W), uint8 [0, 255] or float in the model range [-1, 1]; centroids are (row, column).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy import ndimage

from modules.evaluation.classifier import FashionMNISTClassifier, classifier_logits


def unit_intensity(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] -> float64 in [0, 1], so real and generated clips are measured alike."""
    if frames.dtype == torch.uint8:
        return frames.double() / 255
    return ((frames.double() + 1) / 2).clamp(0, 1)  # a generated clip may overshoot the range


def intensity_centroid(images: torch.Tensor) -> torch.Tensor:
    """The intensity-weighted centroid (row, column) of pixel centres, (..., H, W) -> (..., 2); NaN when blank."""
    images = images.double()
    h, w = images.shape[-2:]
    mass = images.sum((-2, -1))
    rows = (images.sum(-1) * torch.arange(h, dtype=torch.float64)).sum(-1) / mass
    cols = (images.sum(-2) * torch.arange(w, dtype=torch.float64)).sum(-1) / mass
    return torch.stack([rows, cols], -1)


def item_centroid_paths(positions: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The true centroid paths (B, F, n, 2) of a real clip: each item's top-left `positions` (B, F, n, 2) plus the
    centroid of its own image in `items` (B, n, S, S)."""
    return positions.double() + intensity_centroid(items)[:, None]


def mean_squared_acceleration(paths: torch.Tensor) -> torch.Tensor:
    """Per clip, the mean over frames and items of |c[f+1] - 2 c[f] + c[f-1]|^2 for centroid paths (B, F, n, 2).

    Zero for motion at constant velocity; a real clip's is nonzero only at its bounces."""
    if paths.shape[1] < 3:
        raise ValueError(f"the acceleration needs at least 3 frames, got {paths.shape[1]}")
    acceleration = paths[:, 2:] - 2 * paths[:, 1:-1] + paths[:, :-2]  # (B, F-2, n, 2)
    return acceleration.pow(2).sum(-1).mean((1, 2))


def label_blobs(intensity: np.ndarray, threshold: float, dilation: int) -> tuple[np.ndarray, int]:
    """The blobs of frames (N, H, W) in [0, 1], as `blob_centroids` defines them: labels (N, H, W), 1..count for
    the blobs and 0 for the background, and the count."""
    mask = intensity > threshold
    if dilation:
        mask = ndimage.binary_dilation(mask, np.ones((1, 2 * dilation + 1, 2 * dilation + 1), dtype=bool))
    within_frame = np.zeros((3, 3, 3), dtype=bool)
    within_frame[1] = True  # connect pixels of one frame only
    return ndimage.label(mask, structure=within_frame)


def blob_centroids(intensity: torch.Tensor, num_blobs: int, threshold: float, dilation: int) -> torch.Tensor:
    """Centroids (N, num_blobs, 2) of the heaviest blobs of frames (N, H, W) in [0, 1], heaviest first.

    A blob is an 8-connected component of the pixels above `threshold`, grown by `dilation` pixels so that an item's
    separate parts (a sandal's straps) count as one; its centroid weighs its pixels by intensity. A frame with fewer
    blobs repeats its heaviest one; a blank frame gives NaN."""
    x = intensity.double().numpy()
    n = x.shape[0]
    labels, count = label_blobs(x, threshold, dilation)
    out = np.full((n, num_blobs, 2), np.nan)
    if count:
        index = np.arange(1, count + 1)
        mass = ndimage.sum_labels(x, labels, index)  # (count,)
        centre = np.array(ndimage.center_of_mass(x, labels, index)).reshape(count, 3)  # (frame, row, column)
        frame = np.rint(centre[:, 0]).astype(np.int64)  # every pixel of a blob is in one frame
        order = np.lexsort((-mass, frame))  # by frame, then heaviest first
        frame, centre = frame[order], centre[order, 1:]
        rank = np.arange(count) - np.searchsorted(frame, frame)  # 0 for a frame's heaviest blob
        keep = rank < num_blobs
        out[frame[keep], rank[keep]] = centre[keep]
    out = np.where(np.isnan(out), out[:, :1], out)
    return torch.from_numpy(out)


def heaviest_blob_boxes(intensity: torch.Tensor, threshold: float = 0.1, dilation: int = 1) -> torch.Tensor:
    """The bounding box (top, left, bottom, right), inclusive, of the heaviest blob (`blob_centroids`) of each frame
    of (N, H, W) in [0, 1], as float64 (N, 4); NaN for a blank frame. Stray specks elsewhere leave it alone."""
    x = intensity.double().numpy()
    labels, count = label_blobs(x, threshold, dilation)
    out = np.full((len(x), 4), np.nan)
    if count:
        mass = ndimage.sum_labels(x, labels, np.arange(1, count + 1))  # (count,)
        slices = ndimage.find_objects(labels)  # per blob: (frame, rows, columns) slices
        frame = np.array([s[0].start for s in slices])
        spans = np.array([[s[1].start, s[2].start, s[1].stop - 1, s[2].stop - 1] for s in slices])
        order = np.lexsort((-mass, frame))  # by frame, then heaviest first
        heaviest = order[np.r_[True, frame[order][1:] != frame[order][:-1]]]  # the first blob of each frame
        out[frame[heaviest]] = spans[heaviest]
    return torch.from_numpy(out)


def item_window_corners(frames: torch.Tensor, size: int, threshold: float = 0.1, dilation: int = 1) -> torch.Tensor:
    """Top-left corners (B, F, 2) of the square windows of `size` px centred on the box of the heaviest blob of each
    frame of clips (B, F, C, H, W); kept inside the frame, and in its middle for a blank frame.

    Fashion-MNIST items are centred in their boxes, so on a real one-item clip with `size` the item's, the window is
    the item's own box give or take a pixel: what an image classifier of the items was trained on."""
    b, f, _, h, w = frames.shape
    if not 1 <= size <= min(h, w):
        raise ValueError(f"a window of {size} px does not fit in {h}x{w} frames")
    boxes = heaviest_blob_boxes(unit_intensity(frames).mean(2).flatten(0, 1), threshold, dilation)  # (B * F, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (B * F, 2)
    centre = torch.where(centre.isnan(), torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=centre.dtype), centre)
    corners = (centre - (size - 1) / 2).round().long().clamp_min(0)
    return torch.minimum(corners, torch.tensor([h - size, w - size])).view(b, f, 2)


def item_windows(frames: torch.Tensor, size: int) -> torch.Tensor:
    """The windows (B, F, C, size, size) at `item_window_corners` of clips (B, F, C, H, W)."""
    b, f, c = frames.shape[:3]
    corners = item_window_corners(frames, size).flatten(0, 1)  # (B * F, 2)
    rows = corners[:, 0, None] + torch.arange(size)  # (B * F, S)
    cols = corners[:, 1, None] + torch.arange(size)
    frame = torch.arange(b * f)[:, None, None]
    windows = frames.flatten(0, 1)[frame, :, rows[:, :, None], cols[:, None, :]]  # (B * F, S, S, C)
    return windows.permute(0, 3, 1, 2).reshape(b, f, c, size, size)


def frame_classes(clips_uint8: torch.Tensor, model: FashionMNISTClassifier, item_size: int) -> torch.Tensor:
    """The Fashion-MNIST classifier's class (B, F) for each frame of one-item clips (B, F, C, H, W), read from the
    frame's `item_windows` of the items' size."""
    windows = item_windows(clips_uint8, item_size)  # (B, F, C, S, S)
    logits = classifier_logits(model, windows.flatten(0, 1))  # (B * F, classes)
    return torch.from_numpy(logits.argmax(1)).view(clips_uint8.shape[:2])


def class_consistency(classes: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """The share of clips whose frames' `classes` (B, F) are all one class, and, given `labels` (B,), the clip's
    label: an item that stays itself from frame to frame."""
    same = (classes == classes[:, :1]).all(1)
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu().reshape(-1)
        if len(labels) != len(classes):
            raise ValueError(f"got {len(classes)} clips but {len(labels)} labels; give one label per clip")
        same &= classes[:, 0] == labels
    return float(same.double().mean())


def link_tracks(centroids: torch.Tensor) -> torch.Tensor:
    """Order each frame's centroids (B, F, n, 2) to follow the previous frame's: the permutation of least total
    squared distance, frame by frame."""
    n = centroids.shape[2]
    orders = torch.tensor(list(itertools.permutations(range(n))))  # (P, n)
    linked = [centroids[:, 0]]
    for f in range(1, centroids.shape[1]):
        candidates = centroids[:, f][:, orders]  # (B, P, n, 2)
        cost = (candidates - linked[-1][:, None]).pow(2).sum((-1, -2))  # (B, P)
        best = cost.argmin(1)  # (B,)
        linked.append(candidates[torch.arange(len(best)), best])
    return torch.stack(linked, 1)  # (B, F, n, 2)


def track_centroids(
    frames: torch.Tensor, num_items: int = 1, threshold: float = 0.1, dilation: int = 1
) -> torch.Tensor:
    """Centroid paths (B, F, n, 2) of the items in clips (B, F, C, H, W), from the pixels alone.

    One item: the intensity-weighted centroid of each whole frame, exact for a real clip. Several: the centroids
    of the `num_items` heaviest blobs (`blob_centroids`), linked from frame to frame; reliable while items do not
    touch."""
    intensity = unit_intensity(frames).mean(2)  # (B, F, H, W)
    if num_items == 1:
        return intensity_centroid(intensity)[:, :, None]  # (B, F, 1, 2)
    b, f, h, w = intensity.shape
    centroids = blob_centroids(intensity.reshape(b * f, h, w), num_items, threshold, dilation)
    return link_tracks(centroids.view(b, f, num_items, 2))


def mean_acceleration(clips: torch.Tensor, num_items: int = 1) -> float:
    """The mean over clips of `mean_squared_acceleration` of the centroid paths tracked from pixels, in px^2 per
    frame^2. A clip with a blank frame has no path, and is left out; NaN if every clip has one."""
    per_clip = mean_squared_acceleration(track_centroids(clips, num_items))  # (B,)
    return float(per_clip.nanmean())


def acceleration_ratio(generated: torch.Tensor, real: torch.Tensor, num_items: int = 1) -> float:
    """The mean squared centroid acceleration of generated clips over that of real clips, both tracked from pixels."""
    ratio = torch.tensor(mean_acceleration(generated, num_items)) / mean_acceleration(real, num_items)
    return float(ratio)  # inf or NaN, not an exception, when the real clips never accelerate


def mean_frame_difference(frames: torch.Tensor) -> torch.Tensor:
    """Per clip, the mean |frame[f+1] - frame[f]| in [0, 1] units over clips (B, F, C, H, W)."""
    x = unit_intensity(frames)
    return (x[:, 1:] - x[:, :-1]).abs().mean((1, 2, 3, 4))


def frame_difference_ratio(generated: torch.Tensor, real: torch.Tensor) -> float:
    """The mean frame-to-frame difference of generated clips over that of real clips: 1 moves as much; 0 is still."""
    return float(mean_frame_difference(generated).mean() / mean_frame_difference(real).mean())
