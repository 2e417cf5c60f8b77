"""Clips from real video: a folder of video files and frame folders, or a `datasets` dataset with a column of videos,
as a torch Dataset of `{"pixel_values": (F, C, H, W) in [-1, 1], "labels": int64}`, like Moving Fashion-MNIST's.

A clip is `num_frames` frames taken every `frame_stride` frames from the start of its video, each resized (shorter
side) and cropped as images are (`images.resize_and_crop`, one crop for all the frames of a clip). Videos are
decoded by PyAV, whose wheel brings its own FFmpeg, so no system codecs are needed. Every clip is probed once at
load, before anything is written: a video's packets are counted up to the length a clip spans and its first frame
is decoded; the frames a clip reads from a frame folder are checked (structure and size). Frames are decoded when a
clip is read.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from modules.config import DataArguments, UserError
from modules.data.checks import convert_mode, in_threads, inspect_image, is_grey_mode, stored_file, warn_small
from modules.data.images import (
    IMAGE_EXTENSIONS,
    DecodedImageDataset,
    LazyColumn,
    TrainData,
    check_size_arguments,
    count_classes,
    dataset_columns,
    dataset_labels_and_captions,
    dataset_row,
    dataset_source,
    folder_columns,
    folder_source,
    open_dataset,
    resize_and_crop,
    stored_values,
)

VIDEO_EXTENSIONS = {".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv"}
FRAME_EXTENSIONS = IMAGE_EXTENSIONS - VIDEO_EXTENSIONS  # a .gif is a video, even of one frame
DEFAULT_NUM_FRAMES = 16


@dataclass(frozen=True)
class ClipSpan:
    """Which frames of a video make its clip: `num_frames` of them, `stride` apart, from the first."""

    num_frames: int
    stride: int

    @property
    def needed(self) -> int:
        """The frames a video must have: the clip's last frame is number (num_frames - 1) * stride."""
        return (self.num_frames - 1) * self.stride + 1

    @property
    def indices(self) -> range:
        return range(0, self.needed, self.stride)

    def __str__(self) -> str:
        return f"--num_frames {self.num_frames} --frame_stride {self.stride}"


def clip_span(args: DataArguments) -> ClipSpan:
    num_frames = DEFAULT_NUM_FRAMES if args.num_frames is None else args.num_frames
    if num_frames < 1:
        raise UserError(f"--num_frames must be at least 1, got {num_frames}")
    if args.frame_stride < 1:
        raise UserError(f"--frame_stride must be at least 1, got {args.frame_stride}")
    return ClipSpan(num_frames, args.frame_stride)


@dataclass(frozen=True)
class ClipShape:
    """What a probe finds: the clip's length (a video's counted only up to what a clip needs) and its first frame's
    size and colour."""

    frames: int
    width: int
    height: int
    grey: bool


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"  # FFmpeg's words, without its error number


def probe_video(source, needed: int) -> ClipShape | str:
    """A video file (a path, bytes, or a `datasets` {"bytes", "path"} value): its packets counted up to `needed`
    (one per frame; demuxing reads no pixels) and its first frame decoded, or why it cannot be decoded."""
    try:
        with av.open(stored_file(source)) as container:
            if not container.streams.video:
                return "cannot decode video (no video stream)"
            stream = container.streams.video[0]
            count, first = 0, None
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's empty packet at the end
                    continue
                count += 1
                if first is None:
                    first = next(iter(packet.decode()), None)
                if count >= needed and first is not None:
                    break
            if first is None:
                first = next(iter(stream.codec_context.decode(None)), None)  # what the decoder still holds
    except Exception as e:  # noqa: BLE001 - FFmpeg and the container's reader raise many types for broken files
        return f"cannot decode video ({_reason(e)})"
    if first is None:
        return "cannot decode video (no frame decodes)"
    return ClipShape(count, first.width, first.height, first.format.name.startswith(("gray", "ya")))


def probe_frames(frames: Sequence[Path], span: ClipSpan) -> ClipShape | str:
    """A frame folder's length, with the frames its clip reads checked (PIL's structure check) and of one size, or
    what is wrong with them."""
    first, grey = None, True
    for frame in frames[: span.needed : span.stride]:
        result = inspect_image(frame, full=False)
        if isinstance(result, str):
            return f"cannot read frame {frame.name} ({result})"
        (w, h), mode = result
        first = first or (frame.name, w, h)
        if (w, h) != first[1:]:
            return f"frame {frame.name} is {w}x{h}, but {first[0]} is {first[1]}x{first[2]}"
        grey = grey and is_grey_mode(mode)
    return ClipShape(len(frames), first[1], first[2], grey)


def probe_clip(source, span: ClipSpan) -> ClipShape | str:
    """A frame folder (the tuple of its frames) or a video file probed."""
    return probe_frames(source, span) if isinstance(source, tuple) else probe_video(source, span.needed)


def check_clips(sources, count: int, name, args: DataArguments, span: ClipSpan) -> tuple[list[int], bool]:
    """Probe every clip once, before anything is written: (indices of those kept, whether all are grey).

    A clip that cannot be decoded stops the run; one shorter than the span stops it too, or with --skip_short_clips
    is left out, counted in one warning. Every process probes the same clips, so all keep the same ones."""
    keep, short, small, grey = [], [], [], True
    probe = functools.partial(probe_clip, span=span)
    for i, result in enumerate(in_threads(probe, sources, count, "checking clips")):
        if isinstance(result, str):
            raise UserError(f"{name(i)}: {result}")
        if result.frames < span.needed:
            if not args.skip_short_clips:
                raise UserError(
                    f"{name(i)}: {result.frames} frames, but {span} needs {span.needed}; pass --skip_short_clips to "
                    "leave such clips out, or lower --num_frames or --frame_stride"
                )
            short.append((i, result.frames))
            continue
        keep.append(i)
        small += [(i, result.width, result.height)] if min(result.width, result.height) < args.resolution else []
        grey = grey and result.grey
    if short:
        i, frames = short[0]
        if not keep:
            raise UserError(
                f"none of the {count} clips has the {span.needed} frames {span} needs (the first, {name(i)}, has "
                f"{frames}); lower --num_frames or --frame_stride"
            )
        warnings.warn(
            f"--skip_short_clips: left out {len(short)} of {count} clips shorter than the {span.needed} frames {span} "
            f"needs, the first {name(i)} ({frames} frames)",
            stacklevel=3,
        )
    warn_small(small, len(keep), "clips", name, args.resolution)
    return keep, grey


def _frame_image(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as a PIL image; one with alpha (an animated GIF's) stays RGBA, so that `convert_mode` puts its
    transparent pixels on white, as it does for images."""
    if any(c.is_alpha for c in frame.format.components):
        return Image.fromarray(frame.to_ndarray(format="rgba"))  # (H, W, 4)
    return frame.to_image()


def _video_frames(source, span: ClipSpan, name: str) -> list[Image.Image]:
    images, decoded = [], 0
    try:
        with av.open(stored_file(source)) as container:
            for decoded, frame in enumerate(container.decode(video=0), 1):
                if decoded - 1 in span.indices:
                    images.append(_frame_image(frame))
                if len(images) == span.num_frames:
                    break
    except Exception as e:  # noqa: BLE001 - as in probe_video
        raise UserError(f"{name}: cannot decode video ({_reason(e)})") from None
    if len(images) < span.num_frames:
        raise UserError(f"{name}: only {decoded} frames decode, but {span} needs {span.needed}")
    return images


def _folder_frames(frames: tuple[Path, ...], span: ClipSpan, name: str) -> list[Image.Image]:
    images = []
    for j in span.indices:
        try:
            image = Image.open(frames[j])
            image.load()
        except (OSError, SyntaxError) as e:
            raise UserError(f"{name}: cannot read frame {frames[j].name} ({e})") from None
        images.append(image)
    return images


def read_clip(source, span: ClipSpan, name: str, mode: str) -> list[Image.Image]:
    """The span's frames of a clip (a video file or a frame folder's frames), in PIL `mode` ('L' or 'RGB')."""
    frames = _folder_frames(source, span, name) if isinstance(source, tuple) else _video_frames(source, span, name)
    return [convert_mode(frame, mode) for frame in frames]


class DecodedClipDataset(DecodedImageDataset):
    """Clips decoded on access, from video files, frame folders or a `datasets` column; an example is
    `{"pixel_values": (F, C, H, W) in [-1, 1], "labels"}`."""

    num_items = 1  # the motion metrics follow one moving thing per clip: the heaviest blob of each frame

    def __init__(self, clips, labels, names, span: ClipSpan, resolution: int, num_channels: int, center_crop: bool):
        super().__init__(clips, labels, names, resolution, num_channels, center_crop)
        self.span = span

    def _uint8(self, i: int) -> torch.Tensor:
        frames = read_clip(self.images[i], self.span, self.names(i), self.mode)
        seed = None if self.center_crop else np.random.SeedSequence().entropy  # one random crop for all frames
        rng = (lambda: None) if seed is None else (lambda: np.random.default_rng(seed))
        return torch.stack([resize_and_crop(f, self.resolution, self.center_crop, rng()) for f in frames])  # (F,C,H,W)

    def uint8_clips(self, n: int) -> torch.Tensor:
        """The first `n` clips as uint8 (n, F, C, H, W), for grids and metrics."""
        return self.uint8_images(n)


@dataclass
class FoundClips:
    """The clips a source holds, once checked, and what goes with them."""

    clips: Sequence  # per clip, a video (path, or stored value) or a frame folder's frames (a tuple of paths)
    labels: Sequence[int] | None
    class_names: tuple[str, ...] | None
    names: Callable[[int], str]  # clip i's name in messages
    captions: list[str] | None
    grey: bool
    source: str  # the source's name in keys


def _scan(root: Path) -> tuple[list[Path], dict[Path, tuple[Path, ...]], list[Path]]:
    """The clips under `root` in path order (video files, and frame folders: folders below `root` that hold images
    and neither videos nor subfolders), each frame folder's frames in name order, and the images in no frame
    folder."""
    clips, frames, loose = [], {}, []
    for folder, subfolders, names in os.walk(root):
        folder = Path(folder)
        videos = [folder / n for n in names if Path(n).suffix.lower() in VIDEO_EXTENSIONS]
        images = sorted(folder / n for n in names if Path(n).suffix.lower() in FRAME_EXTENSIONS)
        clips += videos
        if images and folder != root and not videos and not subfolders:
            clips.append(folder)
            frames[folder] = tuple(images)
        else:
            loose += images
    return sorted(clips), frames, sorted(loose)


def is_video_folder(path) -> bool:
    """Whether `path` is a folder that holds clips: video files, or frame folders. Class subfolders of images look
    like frame folders, so a folder of those is one too: this tells that a folder holds videos (e.g. where an image
    folder finds no images), not that it is no image folder."""
    root = Path(path)
    return root.is_dir() and bool(_scan(root)[0])


def _no_clips(data_dir: str, loose: list[Path]) -> UserError:
    kinds = f"a video file ({', '.join(sorted(VIDEO_EXTENSIONS))}) or a folder of its frames"
    if loose:
        return UserError(
            f"--train_data_dir '{data_dir}' holds images, not clips ({len(loose)} images, the first {loose[0]}); a "
            f"clip is {kinds}; to train on the images, leave --num_frames unset"
        )
    return UserError(f"--train_data_dir: no clips under '{data_dir}'; a clip is {kinds}")


def _video_folder(args: DataArguments, span: ClipSpan) -> FoundClips:
    root = Path(args.train_data_dir)
    if not root.is_dir():
        raise UserError(f"--train_data_dir: no such directory '{args.train_data_dir}'")
    clips, frames, loose = _scan(root)
    if not clips:
        raise _no_clips(args.train_data_dir, loose)
    if loose:
        warnings.warn(
            f"left out {len(loose)} images that are in no frame folder, the first {loose[0]} (a frame folder holds "
            "a clip's frames only: no videos, no subfolders)",
            stacklevel=3,
        )
    columns = folder_columns(root, clips, args)
    clips = clips[: args.max_train_samples] if args.max_train_samples else clips
    sources = [frames.get(clip, clip) for clip in clips]
    keep, grey = check_clips(sources, len(sources), lambda i: str(clips[i]), args, span)
    clips, sources = [clips[i] for i in keep], [sources[i] for i in keep]
    files = [f for s in sources for f in (s if isinstance(s, tuple) else (s,))]
    labels, captions, names = columns.labels(clips), columns.captions(clips), (lambda i: str(clips[i]))
    return FoundClips(sources, labels, columns.class_names, names, captions, grey, folder_source(root, files))


def _holds_files(feature) -> bool:
    """Whether a `datasets` feature holds files as the loader reads them: paths, bytes, or {"bytes", "path"}."""
    if isinstance(feature, dict):
        return "bytes" in feature or "path" in feature
    return getattr(feature, "dtype", None) in ("string", "large_string", "binary", "large_binary")


def _video_dataset(args: DataArguments, span: ClipSpan) -> FoundClips:
    import datasets

    ds = open_dataset(args)
    column, columns = args.video_column, ds.column_names
    if column not in columns:
        raise UserError(
            f"dataset '{args.dataset_name}' has no video column '{column}' (columns: {', '.join(columns)}); pass "
            "--video_column"
        )
    feature = ds.features[column]
    if isinstance(feature, datasets.Video):
        ds = ds.cast_column(column, datasets.Video(decode=False))  # the stored file: PyAV decodes it, not `datasets`
    elif not _holds_files(feature):
        raise UserError(
            f"dataset '{args.dataset_name}': column '{column}' holds {feature}, not videos (their bytes, or paths); "
            f"pass --video_column (columns: {', '.join(columns)})"
        )
    label_column, class_names, caption_column = dataset_columns(ds, args)
    row = dataset_row(args)
    rows, grey = check_clips(stored_values(ds, column), len(ds), lambda i: f"{row(i)}.{column}", args, span)
    if len(rows) < len(ds):
        ds = ds.select(rows)
    labels, captions = dataset_labels_and_captions(ds, rows, label_column, caption_column, row)
    names = lambda i: f"{row(rows[i])}.{column}"
    return FoundClips(LazyColumn(ds, column), labels, class_names, names, captions, grey, dataset_source(args, ds))


def load_video_data(args: DataArguments) -> TrainData:
    """Open the clips named by `args` (--train_data_dir, else --dataset_name with --video_column); raise
    `UserError` for anything a user must fix, before anything is written."""
    check_size_arguments(args)
    span = clip_span(args)
    if args.train_data_dir is not None:
        found = _video_folder(args, span)
    elif args.dataset_name and args.dataset_name != "fashion_mnist":
        found = _video_dataset(args, span)
    else:
        raise UserError("video data: give --train_data_dir (videos, frame folders) or --dataset_name with videos")
    channels = args.num_channels or (1 if found.grey else 3)
    dataset = DecodedClipDataset(
        found.clips, found.labels, found.names, span, args.resolution, channels, args.center_crop
    )
    num_classes = count_classes(found.labels, found.class_names)
    frames = f"{span.num_frames}f-stride{span.stride}"
    key = f"{found.source}-{len(found.clips)}-{frames}-{args.resolution}px-{channels}ch"
    return TrainData(dataset, channels, num_classes, found.class_names, key, found.captions, span.num_frames)
