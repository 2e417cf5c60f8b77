"""Inception metrics against independent computations and on real Fashion-MNIST images."""

import numpy as np
import pytest
import scipy.linalg
import torch

from modules.data.images import FASHION_MNIST_DIR, load_fashion_mnist
from modules.evaluation.fid import InceptionFeatures, fid_statistics, frechet_distance, image_metrics
from modules.pixels import resize_uint8


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(batch_size=16)


@pytest.fixture(scope="module")
def fashion_test_images():
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: run make setup (installs dataset-fashion-mnist)")
    images, _ = load_fashion_mnist("test")
    return resize_uint8(images[:40, None], 32)


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root, independent of torch-fidelity."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32))
    ours = frechet_distance(*fid_statistics(a), *fid_statistics(b))
    assert ours == pytest.approx(numpy_fid(a, b), rel=1e-3)


def test_fid_and_kid_on_fashion_mnist_halves_and_noise(inception, fashion_test_images, tmp_path):
    half_a, half_b = fashion_test_images[:20], fashion_test_images[20:40]
    noise = torch.randint(0, 256, half_a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    seen = []  # every batch of features the metrics asked for, to check them against scipy without recomputing
    known = {}  # the same images give the same features: computed once

    class Recorded:
        weights_tag = inception.weights_tag

        def __call__(self, images):
            key = images.numpy().tobytes()
            known[key] = known[key] if key in known else inception(images)
            seen.append(known[key])
            return seen[-1]

    features = Recorded()

    kwargs = dict(metrics=("fid", "kid"), cache_dir=tmp_path, features=features)
    real = image_metrics(half_a, "fmnist-test-halfb", lambda: half_b, **kwargs)
    fb, fa = seen  # the reference first, then the generated images
    fake = image_metrics(noise, "fmnist-test-halfb", lambda: pytest.fail("cached"), **kwargs)
    assert len(seen) == 3  # the reference statistics came from the cache
    assert real["fid"] < 0.5 * fake["fid"]
    assert real["kid"] < 0.2 * fake["kid"] and fake["kid"] > 0
    # the same features through scipy give the same FID
    assert real["fid"] == pytest.approx(numpy_fid(fa, fb), rel=1e-3)
    itself = image_metrics(half_b, "fmnist-test-halfb", lambda: pytest.fail("cached"), **kwargs)
    # KID's estimator is unbiased, so a set against itself comes out slightly negative, not exactly zero
    assert abs(itself["fid"]) < 1e-2 and itself["kid"] < 0.05 * fake["kid"]
