"""A small Fashion-MNIST CNN as a fast domain metric: Frechet distance of its features, and class accuracy.

Inception FID runs at a few images per second on CPU; this network reads thousands. Its penultimate layer
(FEATURE_DIM ReLU features) plays the role of Inception's pool3, so `classifier_frechet_distance` is FID with a
Fashion-MNIST-trained network: comparable between runs that use the same cached classifier, not to published FIDs.
`class_accuracy` asks whether a class-conditional model draws the class it was told to.

Images go in as uint8 (N, C, H, W) with C = 1 or 3 (averaged to grey), or (N, H, W); any other size than
32x32 is resized with `resize_uint8`, as the training images were.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from modules.data.images import load_fashion_mnist
from modules.evaluation.fid import default_cache_dir, fid_statistics, frechet_distance
from modules.files import write_atomically, write_text_atomically
from modules.pixels import resize_uint8, to_model_range

CLASSIFIER_VERSION = "v1"  # bump when the network or the training recipe changes: it names the cache file
RESOLUTION = 32
NUM_CLASSES = 10
FEATURE_DIM = 128
TRAIN_EPOCHS = 4
TRAIN_BATCH_SIZE = 128
TRAIN_SEED = 0


class FashionMNISTClassifier(nn.Module):
    """Three blocks of (4x4 conv with stride 2, batch norm, ReLU) from 32 to 16, 8 and 4 px, a FEATURE_DIM-d ReLU
    layer, and a linear head to the classes. Input: (B, 1, 32, 32) in [-1, 1].

    Strided convolutions rather than conv + max pool: about 7x cheaper to train on CPU, where full-resolution
    activations dominate the cost, and still 92% accurate on the test split after 4 epochs.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = FEATURE_DIM):
        super().__init__()
        blocks, in_channels = [], 1
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.conv = nn.Sequential(*blocks)
        side = RESOLUTION // 2 ** len(channels)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim), the ones the Frechet distance compares."""
        return self.feature(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, NUM_CLASSES)."""
        return self.head(self.features(x))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_grey_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) or (N, H, W) -> uint8 (N, 1, 32, 32): channels averaged, then resized."""
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"the classifier needs uint8 images of shape (N, 1 or 3, H, W) or (N, H, W), got {images.dtype} "
            f"{tuple(images.shape)}; convert from [-1, 1] with modules.data.to_uint8"
        )
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"the classifier needs square images, got {images.shape[-2]}x{images.shape[-1]}")
    if images.shape[1] == 3:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return resize_uint8(images, RESOLUTION)


@torch.no_grad()
def _map_batches(model: nn.Module, fn, images, batch_size: int) -> np.ndarray:
    """Concatenate `fn(model, batch)` in float64 over batches of images, with the model in eval mode."""
    if len(images) == 0:
        raise ValueError("the classifier needs at least one image, got none")
    was_training, device = model.training, _device_of(model)
    model.eval()
    try:
        out = [
            fn(model, to_model_range(_as_grey_uint8(batch).to(device))).double().cpu()
            for batch in torch.as_tensor(images).split(batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def classifier_features(model: FashionMNISTClassifier, images_uint8, batch_size: int = 512) -> np.ndarray:
    """Penultimate features (N, FEATURE_DIM) float64 of uint8 images."""
    return _map_batches(model, lambda m, x: m.features(x), images_uint8, batch_size)


def classifier_logits(model: FashionMNISTClassifier, images_uint8, batch_size: int = 512) -> np.ndarray:
    """Class logits (N, NUM_CLASSES) float64 of uint8 images."""
    return _map_batches(model, lambda m, x: m(x), images_uint8, batch_size)


def classifier_frechet_distance(generated_uint8, reference_uint8, model: FashionMNISTClassifier) -> float:
    """Frechet distance between Gaussian fits (mu, S) of the classifier features of two image sets:
    |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)). 0 for identical sets; needs >= 2 images each."""
    mu_gen, sigma_gen = fid_statistics(classifier_features(model, generated_uint8))
    mu_ref, sigma_ref = fid_statistics(classifier_features(model, reference_uint8))
    return frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)


def class_accuracy(generated_uint8, intended_labels, model: FashionMNISTClassifier) -> float:
    """Fraction of images that the classifier assigns to the class they were generated for (or labelled with)."""
    labels = torch.as_tensor(intended_labels).long().cpu().reshape(-1)
    if len(labels) != len(generated_uint8):
        raise ValueError(f"got {len(generated_uint8)} images but {len(labels)} labels; give one label per image")
    predicted = torch.from_numpy(classifier_logits(model, generated_uint8).argmax(1))
    return float((predicted == labels).double().mean())


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (B, C, H, W) by up to `max_shift` px per axis, drawn from `generator`; the border
    is filled with -1 (Fashion-MNIST's black background)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_classifier(
    images_uint8: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = TRAIN_EPOCHS,
    batch_size: int = TRAIN_BATCH_SIZE,
    seed: int = TRAIN_SEED,
    lr: float = 3e-3,
    max_shift: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FashionMNISTClassifier:
    """Train a `FashionMNISTClassifier` on uint8 images (N, 1, 32, 32) and int labels (N,); returns it in eval mode.

    On CPU, a pure function of the data, `seed` and the thread count: the init draws from the global RNG seeded by
    it (then restored, so the caller's stream is untouched), the shuffling and the optional random shift
    (`max_shift` px) from a `torch.Generator` seeded by it. AdamW, one-cycle learning rate peaking at `lr`.
    """
    images = _as_grey_uint8(images_uint8)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != len(images) or len(images) < batch_size:
        raise ValueError(
            f"need at least one batch ({batch_size}) of labelled images, got {len(images)} images and "
            f"{len(labels)} labels"
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionMNISTClassifier().to(device)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(images) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="training the classifier", unit="batch", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = to_model_range(images[idx])
            if max_shift:
                x = random_shift(x, max_shift, generator)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def classifier_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<cache_dir>/classifier/fashion_mnist_cnn-<version>.safetensors`, cache_dir defaulting to
    `default_cache_dir()`; its measured test accuracy sits next to it in a .json of the same name."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "classifier" / f"fashion_mnist_cnn-{CLASSIFIER_VERSION}.safetensors"


def load_or_train_classifier(cache_dir: str | os.PathLike | None = None) -> FashionMNISTClassifier:
    """The Fashion-MNIST classifier on CPU in eval mode: read from `classifier_path(cache_dir)`, or trained on the
    train split on first use (about 2 minutes on one free CPU core), tested on the test split, and saved there.

    On a CPU busy with other work, `torch.set_num_threads(1)` first: two contended threads trained 5x slower.
    """
    path = classifier_path(cache_dir)
    model = FashionMNISTClassifier()
    if path.is_file():
        model.load_state_dict(safetensors.torch.load_file(path))
        return model.eval()
    print(f"training the Fashion-MNIST classifier once; it will be cached at {path}")
    images, labels = load_fashion_mnist("train")
    start = time.perf_counter()
    model = train_classifier(resize_uint8(images[:, None], RESOLUTION), labels).cpu()
    train_seconds = time.perf_counter() - start
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = class_accuracy(test_images, test_labels, model)
    print(f"classifier test accuracy {accuracy:.4f} after {train_seconds:.0f} s of training")
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda f: f.write(safetensors.torch.save(state_dict)))
    info = {
        "test_accuracy": accuracy,
        "num_test_images": len(test_labels),
        "num_train_images": len(labels),
        "train_seconds": round(train_seconds, 1),
        "epochs": TRAIN_EPOCHS,
        "seed": TRAIN_SEED,
        "torch": torch.__version__,
    }
    write_text_atomically(path.with_suffix(".json"), json.dumps(info, indent=2))
    return model
