"""Data sources, transforms, and the resumable, sharded data order."""

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config import DataArguments, UserError
from modules.data.batches import random_flip
from modules.data.images import FASHION_MNIST_DIR, collate_examples, read_idx
from modules.data.order import ResumableBatchSampler
from modules.data.sources import load_train_data
from modules.pixels import to_model_range, to_uint8


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_bad_header(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="needs make setup")
def test_fashion_mnist_from_debian_files():
    data = load_train_data(DataArguments(dataset_split="test", max_train_samples=100, num_channels=3))
    batch = data.dataset.__getitems__(list(range(10)))
    assert batch["pixel_values"].shape == (10, 3, 32, 32)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey replicated
    assert batch["labels"].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the first ten test labels
    assert data.num_classes == 10 and data.class_names[9] == "ankle boot"


def test_fashion_mnist_without_any_source_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr("modules.data.images.FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_train_data(DataArguments())


def _folder(tmp_path, modes=("RGB", "RGBA", "L", "CMYK", "P")):
    root = tmp_path / "imgs"
    for i, mode in enumerate(modes):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (40 + i, 30)).save(cls / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    return root


def test_image_folder_with_class_subfolders_and_mixed_modes(tmp_path):
    data = load_train_data(DataArguments(train_data_dir=str(_folder(tmp_path)), resolution=16), need_labels=True)
    assert data.num_channels == 3 and data.num_classes == 2 and data.class_names == ("a", "b")
    batch = collate_examples([data.dataset[i] for i in range(len(data.dataset))])
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1, 1]


def test_image_folder_metadata_labels_and_small_images(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rows = []
    for i in range(3):
        Image.new("L", (8, 6), 40 * i).save(root / f"{i}.png")  # smaller than the resolution: upscaled
        rows.append({"file_name": f"{i}.png", "label": 2 - i})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_train_data(DataArguments(train_data_dir=str(root), resolution=16))
    assert data.num_channels == 1 and data.num_classes == 3
    item = data.dataset[0]
    assert item["pixel_values"].shape == (1, 16, 16) and item["labels"].item() == 2
    with pytest.raises(UserError, match="no column 'category'"):
        load_train_data(DataArguments(train_data_dir=str(root), label_column="category"))


def test_a_dataset_written_by_save_to_disk_and_its_splits(tmp_path):
    import datasets

    images = [Image.new("L", (8, 8), v) for v in (0, 255)]
    split = datasets.Dataset.from_dict({"image": images, "label": [1, 0]}).cast_column("image", datasets.Image())
    split.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "dict"))
    for name in ("one", "dict"):
        data = load_train_data(DataArguments(dataset_name=str(tmp_path / name), resolution=8))
        assert data.num_classes == 2 and data.dataset[1]["pixel_values"].max() == 1
    with pytest.raises(UserError, match=r"has no split 'test' \(splits: train\); pass --dataset_split"):
        load_train_data(DataArguments(dataset_name=str(tmp_path / "dict"), dataset_split="test"))


def test_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(x)), x)


def test_data_order_resumes_exactly_and_shards_are_disjoint():
    full = ResumableBatchSampler(100, 8, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(30)]  # crosses epoch boundaries (12 batches per epoch)
    resumed = iter(ResumableBatchSampler(100, 8, seed=3, start_batch=17))
    assert [next(resumed) for _ in range(13)] == batches[17:]
    epoch0 = [i for b in batches[:12] for i in b]
    assert len(set(epoch0)) == 96  # no repeats inside an epoch
    assert batches[:12] != batches[12:24]  # a new order each epoch
    ranks = [ResumableBatchSampler(100, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    shard0, shard1 = (set(s.epoch_indices(0).tolist()) for s in ranks)
    assert not shard0 & shard1 and len(shard0) == len(shard1) == 50


def test_random_flip_is_reproducible():
    x = torch.arange(2 * 4 * 4.0).view(2, 1, 4, 4).repeat(8, 1, 1, 1)
    a = random_flip(x, torch.Generator().manual_seed(0))
    b = random_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = [(a[i] == x[i].flip(-1)).all().item() for i in range(len(x))]
    assert 0 < sum(flipped) < len(x)
