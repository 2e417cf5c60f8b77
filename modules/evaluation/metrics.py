"""The metrics of generated images that training, sample.py and the benches report (--eval_metrics): Inception
FID and KID against cached reference statistics, and the Fashion-MNIST classifier's Frechet distance and accuracy."""

from __future__ import annotations

import torch

from modules.evaluation.classifier import class_accuracy, classifier_frechet_distance, load_or_train_classifier
from modules.evaluation.fid import InceptionFeatures, image_metrics

EVAL_METRICS = ("fid", "kid", "classifier")


def parse_eval_metrics(spec: str) -> list[str]:
    """'fid,kid' -> ["fid", "kid"]; a ValueError names any unknown metric."""
    wanted = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(EVAL_METRICS))
    if unknown or not wanted:
        named = ", ".join(unknown) or repr(spec)
        raise ValueError(f"unknown {named} (choose from {', '.join(EVAL_METRICS)})")
    return wanted


def evaluate_generated(
    images: torch.Tensor,
    labels,
    data,
    num_reference: int,
    metrics=("fid",),
    features: InceptionFeatures | None = None,
    weights_path: str | None = None,
) -> dict[str, float]:
    """`metrics` of generated uint8 images against the first `num_reference` images of `data` (a TrainData):
    Inception FID/KID with the reference cached by `data.key`, and for "classifier" the Fashion-MNIST classifier's
    Frechet distance (`fd_classifier`) and, given the labels the images were generated for, `class_accuracy`.

    The reference images are decoded at most once, and only when something is not cached."""
    import functools

    reference_images = functools.cache(lambda: data.dataset.uint8_images(num_reference))
    inception = [m for m in ("fid", "kid") if m in metrics]
    values = {}
    if inception:
        features = features or InceptionFeatures(weights_path=weights_path)
        values = image_metrics(images, f"{data.key}-first{num_reference}", reference_images, inception, None, features)
    if "classifier" in metrics:
        classifier = load_or_train_classifier()
        values["fd_classifier"] = classifier_frechet_distance(images, reference_images(), classifier)
        if labels is not None:
            values["class_accuracy"] = class_accuracy(images, labels, classifier)
    return values
