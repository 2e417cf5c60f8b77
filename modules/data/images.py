"""Open any image source as a torch Dataset of `{"pixel_values": (C,H,W) in [-1, 1], "label": int}`.

Sources: Fashion-MNIST (Debian's IDX files, else the Hub copy), any `datasets` dataset, or a folder of images.
The data order is a pure function of (seed, epoch, rank), so a resumed run reads exactly the batches it would have.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modules.config import DataArguments, UserError
from modules.data.checks import check_captions, check_images, open_image
from modules.pixels import resize_uint8, to_model_range

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian header of dims, then uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (images uint8 (N,28,28), labels int64 (N,)). Debian's files first, else the Hub copy."""
    if split not in ("train", "test"):
        raise UserError(f"fashion_mnist has splits 'train' and 'test', not '{split}'")
    prefix = "train" if split == "train" else "t10k"
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if images_path.is_file() and labels_path.is_file():
        images, labels = read_idx(images_path), read_idx(labels_path)
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    import datasets

    try:
        ds = datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means neither source is usable
        raise UserError(
            f"fashion_mnist: {images_path} not found (install the Debian package dataset-fashion-mnist) and the Hub "
            f"copy '{FASHION_MNIST_HUB_ID}' could not be loaded ({type(e).__name__}); offline, set HF_HUB_OFFLINE=1 "
            "only if it is already cached"
        ) from None
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    return torch.from_numpy(images), torch.tensor(ds["label"], dtype=torch.int64)


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N,C,H,W) at the training resolution; batches are gathered in one index op."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"pixel_values": to_model_range(self.images[idx])}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch

    def __getitem__(self, i):
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}

    def uint8_images(self, n: int) -> torch.Tensor:
        return self.images[:n]


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, rng: np.random.Generator | None = None):
    """Resize the shorter side to `resolution` (bicubic, antialiased) and crop a square; returns uint8 (C,H,W)."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    if center_crop or rng is None:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = int(rng.integers(0, new_w - resolution + 1)), int(rng.integers(0, new_h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


class DecodedImageDataset(torch.utils.data.Dataset):
    """Images decoded on access from a `datasets.Dataset` column or from files, then resized and cropped."""

    def __init__(self, images, labels, names, resolution: int, num_channels: int, center_crop: bool):
        self.images, self.labels, self.names = images, labels, names
        self.resolution, self.mode, self.center_crop = resolution, "L" if num_channels == 1 else "RGB", center_crop

    def __len__(self):
        return len(self.images)

    def _uint8(self, i: int) -> torch.Tensor:
        image = open_image(self.images[i], self.names(i), self.mode)
        rng = None if self.center_crop else np.random.default_rng()
        return resize_and_crop(image, self.resolution, self.center_crop, rng)

    def __getitem__(self, i):
        item = {"pixel_values": to_model_range(self._uint8(i))}
        if self.labels is not None:
            item["labels"] = torch.tensor(int(self.labels[i]), dtype=torch.long)
        return item

    def uint8_images(self, n: int) -> torch.Tensor:
        return torch.stack([self._uint8(i) for i in range(min(n, len(self)))])


def collate_examples(examples):
    """Stack a list of examples; a batch already gathered by `__getitems__` passes through."""
    if isinstance(examples, dict):
        return examples
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


@dataclass
class TrainData:
    dataset: torch.utils.data.Dataset
    num_channels: int
    num_classes: int  # 0 when the data has no labels
    class_names: tuple[str, ...] | None
    key: str  # names the data for caches (e.g. FID reference statistics)
    captions: Sequence[str] | None = None  # by index; not in the dataset's items, so batches stay tensors
    num_frames: int = 0  # frames per clip of clip data (examples (F, C, H, W)); 0 for images


def short_digest(text: str) -> str:
    """A short content digest, so caches keyed by it (e.g. FID statistics) never mix two datasets."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _caption_column(args: DataArguments, columns, where: str) -> str | None:
    """The caption column: --caption_column, which must exist ('none': no captions), else 'caption' or 'text' if
    there is one."""
    if args.caption_column is None:
        return next((c for c in ("caption", "text") if c in columns), None)
    if args.caption_column == "none":
        return None
    if args.caption_column not in columns:
        close = difflib.get_close_matches(args.caption_column, list(columns), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"{where}: no caption column '{args.caption_column}' (columns: {', '.join(columns) or 'none'}); "
            f"{hint}pass --caption_column"
        )
    return args.caption_column


def _metadata_column(metadata: dict, files, column: str, meta_path) -> list:
    """The metadata.jsonl value of `column` for every file (or folder); every one must have one."""
    values = []
    for p in files:
        row = metadata.get(str(p.resolve()))
        if row is None or column not in row:
            raise UserError(f"{meta_path}: no '{column}' for {p}")
        values.append(row[column])
    return values


def _read_metadata(root: Path) -> tuple[dict, Path]:
    """The rows of `root`/metadata.jsonl by the resolved path their 'file_name' names (none: {}), and its path."""
    metadata = {}
    meta_path = root / "metadata.jsonl"
    if meta_path.is_file():
        for n, line in enumerate(meta_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{meta_path}:{n}: not valid JSON") from None
            if "file_name" not in row:
                raise UserError(f"{meta_path}:{n}: missing key 'file_name' (keys: {', '.join(row)})")
            metadata[str((root / row["file_name"]).resolve())] = row
    return metadata, meta_path


@dataclass
class FolderColumns:
    """What a data folder's metadata.jsonl and subfolders give its items (image files, or clips): labels from a
    metadata column or one class per subfolder, and captions from a metadata column."""

    root: Path
    metadata: dict
    meta_path: Path
    label_column: str | None  # a metadata column; None: labels from subfolders (when class_names) or none
    class_names: tuple[str, ...] | None
    caption_column: str | None

    def labels(self, items: list[Path]) -> list[int] | None:
        if self.label_column:
            return [int(v) for v in _metadata_column(self.metadata, items, self.label_column, self.meta_path)]
        if self.class_names:
            index = {name: i for i, name in enumerate(self.class_names)}
            return [index[p.parent.relative_to(self.root).as_posix()] for p in items]
        return None

    def captions(self, items: list[Path]) -> list[str] | None:
        if not self.caption_column:
            return None
        values = _metadata_column(self.metadata, items, self.caption_column, self.meta_path)
        where = lambda i: f"{self.meta_path} ({items[i].relative_to(self.root)})"
        return check_captions(values, self.caption_column, where)


def folder_columns(root: Path, items: list[Path], args: DataArguments) -> FolderColumns:
    """Read `root`'s metadata.jsonl and pick the label and caption columns for `items` (all of them, before any are
    left out, so that the classes do not depend on --max_train_samples)."""
    metadata, meta_path = _read_metadata(root)
    columns = sorted({k for row in metadata.values() for k in row} - {"file_name"})
    label_column = args.label_column
    if label_column is None and "label" in columns:
        label_column = "label"
    from_metadata = bool(label_column and label_column != "none")
    if from_metadata and label_column not in columns:
        raise UserError(
            f"{meta_path}: no column '{label_column}' (columns: {', '.join(columns) or 'none'}); "
            "pass --label_column none to train without labels"
        )
    class_names = None
    parents = sorted({p.parent.relative_to(root).as_posix() for p in items})
    if not from_metadata and label_column != "none" and len(parents) > 1 and "." not in parents:
        class_names = tuple(parents)
    caption_column = _caption_column(args, columns, str(meta_path))
    return FolderColumns(
        root, metadata, meta_path, label_column if from_metadata else None, class_names, caption_column
    )


def _image_folder(data_dir: str, args: DataArguments):
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--train_data_dir: no such directory '{data_dir}'")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"--train_data_dir: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under '{data_dir}'")
    columns = folder_columns(root, files, args)
    files = files[: args.max_train_samples] if args.max_train_samples else files
    keep, grey = check_images(files, len(files), lambda i: str(files[i]), args)
    files = [files[i] for i in keep]
    labels, captions = columns.labels(files), columns.captions(files)
    return [str(p) for p in files], labels, columns.class_names, (lambda i: str(files[i])), captions, grey


class EmptySplitError(UserError):
    """The split exists but holds no rows."""


class LazyColumn:
    """One column of a `datasets.Dataset`, decoded row by row on access rather than all at once."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds, column

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[int(i)][self.column]


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk, which load_dataset refuses to read."""
    folder = Path(path)
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved_dataset(args: DataArguments):
    import datasets

    ds = datasets.load_from_disk(args.dataset_name)
    if isinstance(ds, datasets.DatasetDict):
        if args.dataset_split not in ds:
            raise UserError(
                f"dataset '{args.dataset_name}' has no split '{args.dataset_split}' (splits: {', '.join(ds)}); "
                "pass --dataset_split"
            )
        ds = ds[args.dataset_split]
    if len(ds) == 0:
        raise EmptySplitError(f"dataset '{args.dataset_name}': split '{args.dataset_split}' is empty")
    return ds


def open_dataset(args: DataArguments):
    """The split of --dataset_name (a Hub id, a local dataset, or a folder written by save_to_disk), cut to
    --max_train_samples; every way it can fail is a UserError saying what to do."""
    import datasets

    try:
        if _is_saved_dataset(args.dataset_name):
            ds = _load_saved_dataset(args)
        else:
            ds = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, split=args.dataset_split, cache_dir=args.cache_dir
            )
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"unknown dataset '{args.dataset_name}': not a local path and not found on the Hub ({e}). Use "
            "--dataset_name fashion_mnist, a Hub dataset id, a local dataset path, or --train_data_dir DIR"
        ) from None
    except ValueError as e:
        if "corresponds to no data" in str(e):  # `datasets`' words for a split with no rows
            raise EmptySplitError(f"dataset '{args.dataset_name}': split '{args.dataset_split}' is empty") from None
        raise UserError(f"dataset '{args.dataset_name}': {e}") from None
    except ConnectionError as e:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f"unknown dataset '{args.dataset_name}': not a local path, and not in the cache, the only place "
                "HF_HUB_OFFLINE=1 lets `datasets` look; unset HF_HUB_OFFLINE to download it, or give a local path "
                f"(e.g. hf download {args.dataset_name} --repo-type dataset --local-dir DIR, then --dataset_name DIR)"
            ) from None
        raise UserError(
            f"unknown dataset '{args.dataset_name}': not a local path, and the Hub could not be reached ({e}); check "
            "the name, or use a local path, or a cached copy with HF_HUB_OFFLINE=1"
        ) from None
    if args.max_train_samples:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    return ds


def dataset_columns(ds, args: DataArguments) -> tuple[str | None, tuple[str, ...] | None, str | None]:
    """The label column of `ds` (None: no labels), its class names when the column has them, and the caption
    column."""
    columns = ds.column_names
    label_column = args.label_column
    if label_column is None and "label" in columns:
        label_column = "label"
    label_column = None if label_column == "none" else label_column
    if label_column and label_column not in columns:
        raise UserError(
            f"dataset '{args.dataset_name}' has no label column '{label_column}' "
            f"(columns: {', '.join(columns)}); pass --label_column, or --label_column none"
        )
    feature = ds.features.get(label_column) if label_column else None
    class_names = tuple(feature.names) if hasattr(feature, "names") else None
    return label_column, class_names, _caption_column(args, columns, f"dataset '{args.dataset_name}'")


def dataset_row(args: DataArguments):
    """Row i's name in messages: dataset[split][i]."""
    return lambda i: f"{args.dataset_name}[{args.dataset_split}][{i}]"


def _hub_dataset(args: DataArguments):
    import datasets

    ds = open_dataset(args)
    columns = ds.column_names
    if args.image_column not in columns:
        raise UserError(
            f"dataset '{args.dataset_name}' has no image column '{args.image_column}' "
            f"(columns: {', '.join(columns)}); pass --image_column"
        )
    feature = ds.features[args.image_column]
    if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) in ("string", "large_string")):
        raise UserError(
            f"dataset '{args.dataset_name}': column '{args.image_column}' holds {feature}, not images (or image "
            f"paths); pass --image_column (columns: {', '.join(columns)})"
        )
    label_column, class_names, caption_column = dataset_columns(ds, args)
    row = dataset_row(args)
    # The stored bytes, read in arrow batches: decoding them here rather than through `datasets` names the bad row.
    sources = stored_values(ds, args.image_column)
    rows, grey = check_images(sources, len(ds), lambda i: f"{row(i)}.{args.image_column}", args)
    if len(rows) < len(ds):
        ds = ds.select(rows)
    labels, captions = dataset_labels_and_captions(ds, rows, label_column, caption_column, row)
    names = lambda i: f"{row(rows[i])}.{args.image_column}"
    return LazyColumn(ds, args.image_column), labels, class_names, names, captions, grey


def dataset_labels_and_captions(ds, rows: list[int], label_column, caption_column, row):
    """The labels and the checked captions of `ds`, whose row i was row `rows[i]` of the dataset `row` names."""
    labels = ds[label_column] if label_column else None
    captions = None
    if caption_column:
        captions = check_captions(ds[caption_column], caption_column, lambda i: f"{row(rows[i])}.{caption_column}")
    return labels, captions


def stored_values(ds, column: str):
    """The values of `column` as stored (a file's {"bytes", "path"}, not the decoded image or video), row by row,
    read in arrow batches."""
    batches = ds.select_columns([column]).with_format("arrow").iter(batch_size=256)
    return (v for batch in batches for v in batch.column(column).to_pylist())


def check_size_arguments(args: DataArguments) -> None:
    if args.resolution <= 0:
        raise UserError(f"--resolution must be positive, got {args.resolution}")
    if args.num_channels not in (None, 1, 3):
        raise UserError(f"--num_channels must be 1 or 3, got {args.num_channels}")


def count_classes(labels, class_names) -> int:
    """The number of classes of `labels` (None: 0): the named ones, else the largest label plus one."""
    if labels is None:
        return 0
    if min(labels) < 0:
        raise UserError(f"labels must be non-negative integers, found {min(labels)}")
    return len(class_names) if class_names else int(max(labels)) + 1


def folder_source(root: Path, files) -> str:
    """A folder's name in keys: its name and a digest of its files' paths, sizes and modification times."""
    listing = "\n".join(f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    return f"folder-{root.resolve().name}-{short_digest(listing)}"


def dataset_source(args: DataArguments, ds) -> str:
    """A dataset's name in keys: its name, split and a digest of its fingerprint."""
    name = Path(args.dataset_name).name if Path(args.dataset_name).exists() else args.dataset_name
    return f"{name.replace('/', '--')}-{args.dataset_split}-{short_digest(ds._fingerprint)}"


def load_image_data(args: DataArguments) -> TrainData:
    """Open the training images named by `args`; raise `UserError` for anything a user must fix. (Every source,
    images and clips, opens through modules/data/sources.py.)"""
    check_size_arguments(args)
    if args.train_data_dir is None and args.dataset_name == "fashion_mnist":
        images, labels = load_fashion_mnist(args.dataset_split)
        if args.max_train_samples:
            images, labels = images[: args.max_train_samples], labels[: args.max_train_samples]
        images = resize_uint8(images[:, None], args.resolution)  # (N, 1, R, R)
        channels = args.num_channels or 1
        images = images.expand(-1, channels, -1, -1).contiguous()
        if args.label_column == "none":
            labels = None
        _caption_column(args, ("image", "label"), "dataset 'fashion_mnist'")  # none: only a named one fails
        key = f"fashion_mnist-{args.dataset_split}-{args.resolution}px-{channels}ch"
        data = TrainData(
            TensorImageDataset(images, labels),
            channels,
            10 if labels is not None else 0,
            FASHION_MNIST_CLASSES if labels is not None else None,
            key,
        )
    else:
        if args.train_data_dir is not None:
            images, labels, class_names, names, captions, grey = _image_folder(args.train_data_dir, args)
            source = folder_source(Path(args.train_data_dir), images)
        elif args.dataset_name:
            images, labels, class_names, names, captions, grey = _hub_dataset(args)
            source = dataset_source(args, images.ds)
        else:
            raise UserError("give --dataset_name or --train_data_dir")
        channels = args.num_channels or (1 if grey else 3)
        num_classes = count_classes(labels, class_names)
        dataset = DecodedImageDataset(images, labels, names, args.resolution, channels, args.center_crop)
        key = f"{source}-{len(images)}-{args.resolution}px-{channels}ch"
        data = TrainData(dataset, channels, num_classes, class_names, key, captions)
    return data


def labels_needed(source: str, fix: str = "") -> UserError:
    """The error of `--class_conditional true` on data without labels, with the ways on."""
    return UserError(
        f"--class_conditional true needs labels, but {source} has none; {fix}pass --class_conditional false (or "
        "leave it unset: auto)"
    )
