"""Every source of training data opens here: images (images.py), Moving Fashion-MNIST clips (video.py) and video
files or a dataset's video column (video_files.py). The arguments say which: `--dataset_name moving_fashion_mnist`,
or `--num_frames` for other clips, else images. A source of clips gives examples (F, C, H, W) and a TrainData whose
`num_frames` is F; images give (C, H, W) and `num_frames` 0."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from modules.config import DataArguments, UserError
from modules.data.images import EmptySplitError, TrainData, labels_needed, load_image_data
from modules.data.video import MOVING_FASHION_MNIST, moving_fashion_mnist_data
from modules.data.video_files import is_video_folder, load_video_data

DEFAULT_NUM_FRAMES = 16


def with_clip_length(args: DataArguments, clips: bool) -> DataArguments:
    """`args` with --num_frames decided: the default clip length when clips are wanted (a video model, the
    shared-noise trainer, or Moving Fashion-MNIST) and none is given. A latent dataset's clips keep the length they
    were encoded with (its latents.json), a pairs dataset's the length they were made with (its pairs.json)."""
    stored = args.latent_dataset or args.pairs_dataset
    if args.num_frames is None and not stored and (clips or is_moving_fashion_mnist(args)):
        return dataclasses.replace(args, num_frames=DEFAULT_NUM_FRAMES)
    return args


def is_moving_fashion_mnist(args: DataArguments) -> bool:
    return args.train_data_dir is None and args.dataset_name == MOVING_FASHION_MNIST


def load_train_data(args: DataArguments, need_labels: bool = False) -> TrainData:
    """Open the training data named by `args`; raise `UserError` for anything a user must fix. `need_labels`:
    --class_conditional true, which data without labels cannot satisfy."""
    if args.num_frames is not None and args.num_frames < 1:
        raise UserError(f"--num_frames must be at least 1, got {args.num_frames}")
    if args.frame_stride < 1:
        raise UserError(f"--frame_stride must be at least 1, got {args.frame_stride}")
    if is_moving_fashion_mnist(args):
        data = moving_fashion_mnist_data(with_clip_length(args, True))
    elif args.num_frames is not None:
        if args.train_data_dir is None and args.dataset_name == "fashion_mnist":
            raise UserError(
                "--dataset_name fashion_mnist holds images, not clips: for clips of Fashion-MNIST items use "
                f"--dataset_name {MOVING_FASHION_MNIST}; for images, an image model without --num_frames"
            )
        data = load_video_data(args)
    else:
        data = _image_data(args)
    if need_labels and data.num_classes == 0:
        source = f"the folder '{args.train_data_dir}'" if args.train_data_dir else f"the dataset '{args.dataset_name}'"
        raise labels_needed(source, "name them with --label_column (or one subfolder per class), or ")
    return data


def reference_images(source: DataArguments | None, made: str) -> TrainData:
    """The images FID compares with, for data `made` from them (a latent or pairs dataset) that names them in
    `source` (None: it does not)."""
    try:
        if source is None:
            raise UserError("it does not name them")
        return load_train_data(source)
    except UserError as e:
        raise UserError(
            f"FID of {made} needs the images it was made from, which failed to open ({e}); pass --fid_num_samples 0"
        ) from None


def _image_data(args: DataArguments) -> TrainData:
    """The images of `args`; a folder without images that holds videos says how to train on them."""
    try:
        return load_image_data(args)
    except UserError as e:
        if args.train_data_dir and "no images" in str(e) and is_video_folder(args.train_data_dir):
            raise UserError(
                f"--train_data_dir '{args.train_data_dir}' holds videos, not images: train a video model "
                "(--model video_*) or the shared-noise trainer (--shared_noise) on them"
            ) from None
        raise


def load_validation_data(args: DataArguments) -> TrainData | None:
    """The held-out data for the validation loss, or None when there is no held-out split. --validation_samples
    counts images: clips of F frames take F of them each (at least one clip)."""
    split = args.validation_split
    if split in (None, "none") or args.validation_samples <= 0:
        return None
    args = with_clip_length(args, False)
    samples = max(1, args.validation_samples // args.num_frames) if args.num_frames else args.validation_samples
    if args.train_data_dir is not None:
        if split == "auto":
            return None
        if not Path(split).is_dir():
            raise UserError(
                f"--validation_split '{split}': an image folder has no splits; give a folder of held-out images, "
                "or 'none'"
            )
        held_out = dataclasses.replace(args, train_data_dir=split, max_train_samples=samples, validation_split="none")
        return _non_empty(load_train_data(held_out), split)
    if split == "auto":
        if args.dataset_name in ("fashion_mnist", MOVING_FASHION_MNIST):
            split = "test"
        else:
            import datasets

            try:
                names = datasets.get_dataset_split_names(args.dataset_name, args.dataset_config_name)
            except Exception:  # noqa: BLE001 - no split listing (offline, unusual builder): no validation
                return None
            split = next((s for s in ("test", "validation") if s in names and s != args.dataset_split), None)
            if split is None:
                return None
    held_out = dataclasses.replace(args, dataset_split=split, max_train_samples=samples, validation_split="none")
    try:
        data = load_train_data(held_out)
    except EmptySplitError:
        data = None
    return _non_empty(data, f"{args.dataset_name}[{split}]")


def _non_empty(data: TrainData | None, name: str) -> TrainData | None:
    """`data`, or None with a warning when it holds nothing: training goes on without a validation loss."""
    if data is None or len(data.dataset) == 0:
        warnings.warn(f"held-out data {name} is empty: no validation loss", stacklevel=3)
        return None
    return data
