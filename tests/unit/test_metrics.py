"""Inception metrics against independent computations and on real Fashion-MNIST images.

Few images: Inception-v3 takes ~0.25 s an image on one CPU core, and each FID ~3.5 s (the eigenvalues of a
2048x2048 matrix), so each test computes one FID, on features that the module computes once."""

import numpy as np
import pytest
import scipy.linalg
import torch

from modules.data.images import FASHION_MNIST_DIR, load_fashion_mnist
from modules.evaluation.fid import InceptionFeatures, fid_statistics, frechet_distance, image_metrics
from modules.pixels import resize_uint8

IMAGES_PER_SET = 4
# With 4 images a set, FID is mostly the bias of so few samples: one half of the images against the other measured
# 267, noise against that half 503. A threshold between them tells which is which.
FID_HALVES_BELOW_NOISE_ABOVE = 380
REFERENCE = "fmnist-test-halfb"


class SharedFeatures:
    """Inception features that compute each set of images once, for all the tests of this module."""

    def __init__(self, inception: InceptionFeatures):
        self.inception, self.weights_tag, self.known = inception, inception.weights_tag, {}

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        key = images.numpy().tobytes()
        if key not in self.known:
            self.known[key] = self.inception(images)
        return self.known[key]


@pytest.fixture(scope="module")
def features():
    return SharedFeatures(InceptionFeatures(batch_size=16))


@pytest.fixture(scope="module")
def fashion():
    """Two halves of the first Fashion-MNIST test images, and uint8 noise of the same shape."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: run make setup (installs dataset-fashion-mnist)")
    images, _ = load_fashion_mnist("test")
    half_a, half_b = resize_uint8(images[: 2 * IMAGES_PER_SET, None], 32).split(IMAGES_PER_SET)
    noise = torch.randint(0, 256, half_a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return half_a, half_b, noise


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root, independent of torch-fidelity."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def in_their_span(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) in an orthonormal basis of the span of all their rows: the same FID (both Gaussians lie in
    that span, and a rotation changes no distance), in N + M dimensions instead of 2048."""
    basis = np.linalg.qr(np.concatenate([a, b]).T)[0]  # (D, N + M)
    return a @ basis, b @ basis


def test_fid_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32))
    ours = frechet_distance(*fid_statistics(a), *fid_statistics(b))
    assert ours == pytest.approx(numpy_fid(a, b), rel=1e-3)
    assert numpy_fid(*in_their_span(a[:5], b[:7])) == pytest.approx(numpy_fid(a[:5], b[:7]), rel=1e-6)


def test_fid_of_fashion_mnist_halves_is_small_and_matches_scipy(features, fashion, tmp_path):
    half_a, half_b, _ = fashion
    real = image_metrics(half_a, REFERENCE, lambda: half_b, ("fid", "kid"), tmp_path, features)
    assert real["fid"] < FID_HALVES_BELOW_NOISE_ABOVE
    # the same features through scipy give the same FID
    assert real["fid"] == pytest.approx(numpy_fid(*in_their_span(features(half_a), features(half_b))), rel=1e-3)


def test_noise_is_far_from_fashion_mnist_in_fid_and_kid(features, fashion, tmp_path):
    half_a, half_b, noise = fashion
    real = image_metrics(half_a, REFERENCE, lambda: half_b, ("kid",), tmp_path, features)
    cached = lambda: pytest.fail("the reference statistics were not read from the cache")
    fake = image_metrics(noise, REFERENCE, cached, ("fid", "kid"), tmp_path, features)
    assert fake["fid"] > FID_HALVES_BELOW_NOISE_ABOVE
    assert real["kid"] < 0.2 * fake["kid"] and fake["kid"] > 0
    itself = image_metrics(half_b, REFERENCE, cached, ("kid",), tmp_path, features)
    # KID's estimator is unbiased, so a set against itself comes out slightly negative, not exactly zero
    assert itself["kid"] < 0.05 * fake["kid"]
