"""The Fashion-MNIST classifier metric: a briefly trained network already separates the classes, its Frechet
distance tells real images from noise, class accuracy tells right labels from wrong ones, and the cache trains once.
Training uses a few thousand images for two epochs (seconds on CPU), never the full training set."""

import json

import numpy as np
import pytest
import torch
from helpers import brief_classifier

from modules.data.images import load_fashion_mnist
from modules.evaluation import classifier
from modules.evaluation.classifier import (
    FEATURE_DIM,
    NUM_CLASSES,
    class_accuracy,
    classifier_features,
    classifier_frechet_distance,
    classifier_logits,
    classifier_path,
    load_or_train_classifier,
    train_classifier,
)
from modules.pixels import resize_uint8

NUM_TRAIN = 2000
NUM_TEST = 1000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # This small network gains little from a second thread, and loses a lot when the cores are shared.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def test_set():
    images, labels = load_fashion_mnist("test")
    return images[:NUM_TEST], labels[:NUM_TEST]


@pytest.fixture(scope="module")
def model():
    return brief_classifier(NUM_TRAIN, epochs=2)


def noise_images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)


def test_brief_training_beats_chance_on_held_out_images(model, test_set):
    images, labels = test_set
    assert class_accuracy(images, labels, model) > 0.6  # chance is 0.1


def test_same_seed_gives_identical_weights():
    images, labels = load_fashion_mnist("train")
    images, labels = resize_uint8(images[:256, None], 32), labels[:256]
    train = lambda seed: train_classifier(images, labels, epochs=1, batch_size=64, seed=seed, progress=False)
    first, again, other = train(0).state_dict(), train(0).state_dict(), train(1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_training_leaves_the_global_rng_alone():
    images, labels = noise_images(64), torch.arange(64) % NUM_CLASSES
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(images, labels, epochs=1, batch_size=64, max_shift=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_features_and_logits_shapes_and_batch_independence(model, test_set):
    images = test_set[0][:100]
    features = classifier_features(model, images, batch_size=512)
    assert features.shape == (100, FEATURE_DIM) and features.dtype == np.float64
    np.testing.assert_allclose(classifier_features(model, images, batch_size=7), features, rtol=1e-5, atol=1e-5)
    logits = classifier_logits(model, images)
    assert logits.shape == (100, NUM_CLASSES) and logits.dtype == np.float64
    assert model.training is False


def test_accepts_28px_rgb_and_numpy(model, test_set):
    images28 = test_set[0][:50]  # (N, 28, 28)
    expected = classifier_features(model, resize_uint8(images28[:, None], 32))
    np.testing.assert_array_equal(classifier_features(model, images28), expected)
    np.testing.assert_array_equal(classifier_features(model, images28[:, None].numpy()), expected)
    rgb = images28[:, None].expand(-1, 3, -1, -1)
    np.testing.assert_array_equal(classifier_features(model, rgb), expected)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(4, 1, 32, 32), torch.zeros(4, 2, 32, 32, dtype=torch.uint8), torch.zeros(4, 1, 32, 30).byte()],
)
def test_rejects_images_it_cannot_read(model, bad):
    with pytest.raises(ValueError, match="classifier needs"):
        classifier_features(model, bad)


def test_frechet_distance_separates_real_from_noise(model, test_set):
    images = test_set[0]
    half = len(images) // 2
    self_distance = classifier_frechet_distance(images, images, model)
    halves = classifier_frechet_distance(images[:half], images[half:], model)
    to_noise = classifier_frechet_distance(images[:half], noise_images(half), model)
    assert abs(self_distance) < 1e-6 * to_noise
    assert 0 < halves < 0.05 * to_noise


def test_class_accuracy_rewards_the_intended_class_only(model, test_set):
    images, labels = test_set
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, labels, model) > 0.6
    assert class_accuracy(images, (labels + 1) % NUM_CLASSES, model) < 0.2
    assert class_accuracy(images, shuffled, model) < 0.2
    with pytest.raises(ValueError, match="one label per image"):
        class_accuracy(images, labels[:-1], model)


def test_load_or_train_trains_once_then_loads_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(
        classifier, "load_fashion_mnist", lambda split: tuple(t[:512] for t in load_fashion_mnist(split))
    )
    calls = []

    def small_budget(images, labels, **kwargs):
        calls.append(len(images))
        return train_classifier(images, labels, epochs=1, batch_size=64, progress=False)

    monkeypatch.setattr(classifier, "train_classifier", small_budget)
    trained = load_or_train_classifier()
    path = classifier_path()
    assert path.parent == tmp_path / "classifier" and path.suffix == ".safetensors" and path.is_file()
    info = json.loads(path.with_suffix(".json").read_text())
    assert 0.1 < info["test_accuracy"] <= 1 and info["num_test_images"] == 512
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])

    loaded = load_or_train_classifier()
    assert calls == [512]
    assert loaded.training is False
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())
