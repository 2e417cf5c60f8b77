"""Checks of images and captions before training starts: every image is opened once (its structure verified, or
decoded in full with --skip_corrupt_images), captions must be strings, and every PIL mode converts predictably."""

from __future__ import annotations

import functools
import io
import itertools
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from modules.config import DataArguments, UserError

GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F"}  # and every "I;16..." mode


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` ('L' or 'RGB'), predictably from any PIL mode.

    16-bit images keep their high byte (PIL's convert would clip every value above 255 to white). Transparent pixels
    (RGBA, LA, PA, or a palette/grey with a transparent colour) are composited onto white, as a viewer shows them;
    dropping alpha would expose whatever colour they happen to hide. CMYK uses PIL's plain conversion (no ICC profile).
    RGB to 'L' is PIL's luma, L = (299 R + 587 G + 114 B) / 1000."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))  # (H, W) uint16 -> uint8
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode == mode:
        return image
    return image.convert("RGB").convert(mode) if mode == "L" else image.convert("RGB")


def open_image(source, name: str, mode: str) -> Image.Image:
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(
            f"cannot read image {name}: {e}; fix or remove it, or pass --skip_corrupt_images to leave such images out"
        ) from None
    return convert_mode(image, mode)


def stored_file(source):
    """What opens a stored file: a path as it is, raw bytes or a `datasets` {"bytes", "path"} value as a file
    object (its path when it holds no bytes)."""
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
    return io.BytesIO(source) if isinstance(source, bytes) else source


def inspect_image(source, full: bool = True) -> tuple[tuple[int, int], str] | str:
    """Check one image (a path, or a `datasets` {"bytes", "path"} value): its ((width, height), mode), or why it
    cannot be read. `full` decodes every pixel. Otherwise PIL's `verify` checks the file's structure (PNG checksums
    included), and a JPEG is decoded only when it does not end with its end-of-image marker: `verify` passes a
    truncated JPEG, the commonest broken download."""
    try:
        with Image.open(stored_file(source)) as image:
            size, mode = image.size, image.mode
            full = full or (image.format == "JPEG" and not _ends_like_jpeg(image.fp))
            image.load() if full else image.verify()
            return size, mode
    except UnidentifiedImageError:
        return "not an image format PIL recognises"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"


def _ends_like_jpeg(f, tail: int = 64) -> bool:
    """Whether the JPEG file `f` holds its end-of-image marker (FF D9) in its last `tail` bytes (some writers pad)."""
    position = f.tell()
    try:
        f.seek(0, io.SEEK_END)
        f.seek(max(f.tell() - tail, 0))
        return b"\xff\xd9" in f.read(tail)
    finally:
        f.seek(position)


def in_threads(check, sources, count: int, desc: str):
    """`check(source)` of every source, in order, run on a few threads a chunk at a time (so that a large dataset's
    bytes are never all in memory), with a progress bar from 1000 sources up."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    sources = iter(sources)
    with (
        ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
        tqdm(total=count, desc=desc, disable=count < 1000) as progress,
    ):
        while chunk := list(itertools.islice(sources, 256)):
            yield from pool.map(check, chunk)
            progress.update(len(chunk))


def warn_small(small: list[tuple[int, int, int]], count: int, what: str, name, resolution: int) -> None:
    """One warning for the (index, width, height) of the `what` smaller than `resolution` among `count`."""
    if small:
        i, w, h = small[0]
        warnings.warn(
            f"{len(small)} of {count} {what} are smaller than --resolution {resolution} (the first, "
            f"{name(i)}, is {w}x{h}): they are upscaled",
            stacklevel=4,
        )


def check_images(sources, count: int, name, args: DataArguments) -> tuple[list[int], bool]:
    """Check every image once, before anything is written: (indices of the readable ones, whether all are grey).

    A corrupt image stops the run, or with --skip_corrupt_images is left out; every process checks the same images
    in the same order, so all keep the same ones. With --skip_corrupt_images each image is decoded in full (about
    1-5 ms for a 512px JPEG or PNG, spread over threads, on every process), since `Image.verify` misses truncated
    JPEGs; without it the check verifies structure and decodes only JPEGs that look truncated, so starting on a
    large dataset stays quick, and an image that still fails to decode during training stops the run naming it."""
    keep, corrupt, small, grey = [], [], [], True
    check = functools.partial(inspect_image, full=args.skip_corrupt_images)
    for i, result in enumerate(in_threads(check, sources, count, "checking images")):
        if isinstance(result, str):
            if not args.skip_corrupt_images:
                raise UserError(
                    f"cannot read image {name(i)}: {result}; fix or remove it, or pass --skip_corrupt_images to "
                    "leave such images out"
                )
            corrupt.append((i, result))
            continue
        keep.append(i)
        (w, h), mode = result
        small += [(i, w, h)] if min(w, h) < args.resolution else []
        grey = grey and is_grey_mode(mode)
    if corrupt:
        i, reason = corrupt[0]
        if not keep:
            raise UserError(f"none of the {count} images can be read, the first {name(i)} ({reason})")
        warnings.warn(
            f"--skip_corrupt_images: left out {len(corrupt)} of {count} images that cannot be read, the first "
            f"{name(i)} ({reason})",
            stacklevel=3,
        )
    warn_small(small, len(keep), "images", name, args.resolution)
    return keep, grey


def is_grey_mode(mode: str) -> bool:
    """Whether PIL `mode` holds one channel of grey (a palette does not count)."""
    return mode in GRAYSCALE_MODES or mode.startswith("I;16")


def check_captions(values, column: str, name) -> list[str]:
    """The captions as strings. A missing value, number or list is an error naming its row; empty captions are
    kept, with a warning, since they train as the unconditional prompt (what a dropped caption is)."""
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise UserError(
                f"caption column '{column}': {name(i)} holds {v!r:.60} ({type(v).__name__}), not a string; fix it, or "
                "pick another column with --caption_column (or --caption_column none)"
            )
    empty = [i for i, v in enumerate(values) if not v.strip()]
    if empty:
        warnings.warn(
            f"caption column '{column}': {len(empty)} of {len(values)} captions are empty (the first: "
            f"{name(empty[0])}); they train as the unconditional prompt",
            stacklevel=3,
        )
    return list(values)
