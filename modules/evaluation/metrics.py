"""The metrics of generated images and clips that training, sample.py and the benches report (--eval_metrics):
Inception FID and KID against cached reference statistics, and the Fashion-MNIST classifier's Frechet distance and
accuracy; for clips, the same per frame, plus whether items keep their class and move as real ones do."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from modules.data.video import item_size_for
from modules.evaluation.classifier import class_accuracy, classifier_frechet_distance, load_or_train_classifier
from modules.evaluation.fid import InceptionFeatures, image_metrics
from modules.evaluation.video_metrics import (
    class_consistency,
    frame_classes,
    frame_difference_ratio,
    mean_acceleration,
)

EVAL_METRICS = ("fid", "kid", "classifier")


def classifier_measures(data_key: str) -> bool:
    """Whether the Fashion-MNIST classifier's metrics measure the data named `data_key`: Fashion-MNIST's images or
    the clips of its items (Moving Fashion-MNIST)."""
    return data_key.startswith(("fashion_mnist", "moving_fashion_mnist"))


def parse_eval_metrics(spec: str) -> list[str]:
    """'fid,kid' -> ["fid", "kid"]; a ValueError names any unknown metric."""
    wanted = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(EVAL_METRICS))
    if unknown or not wanted:
        named = ", ".join(unknown) or repr(spec)
        raise ValueError(f"unknown {named} (choose from {', '.join(EVAL_METRICS)})")
    return wanted


def _distribution_metrics(
    images: torch.Tensor,
    reference_key: str,
    reference_images: Callable[[], torch.Tensor],
    metrics,
    features: InceptionFeatures | None,
    weights_path: str | None,
) -> tuple[dict[str, float], object]:
    """Inception FID/KID (reference statistics cached under `reference_key`) and, for "classifier", `fd_classifier`
    of uint8 images (N, C, H, W) against `reference_images()`; returns them and the classifier (None if unused)."""
    inception = [m for m in ("fid", "kid") if m in metrics]
    values, classifier = {}, None
    if inception:
        features = features or InceptionFeatures(weights_path=weights_path)
        values = image_metrics(images, reference_key, reference_images, inception, None, features)
    if "classifier" in metrics:
        classifier = load_or_train_classifier()
        values["fd_classifier"] = classifier_frechet_distance(images, reference_images(), classifier)
    return values, classifier


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
    Clips (N, F, C, H, W) go to `evaluate_clips`, with `num_reference` counting clips.

    The reference images are decoded at most once, and only when something is not cached."""
    if images.ndim == 5:
        return evaluate_clips(images, labels, data, num_reference, metrics, features, weights_path)
    reference_images = functools.cache(lambda: data.dataset.uint8_images(num_reference))
    key = f"{data.key}-first{num_reference}"
    values, classifier = _distribution_metrics(images, key, reference_images, metrics, features, weights_path)
    if classifier is not None and labels is not None:
        values["class_accuracy"] = class_accuracy(images, labels, classifier)
    return values


def evaluate_clips(
    clips_uint8: torch.Tensor,
    labels,
    data,
    num_reference_clips: int,
    metrics=("fid",),
    features: InceptionFeatures | None = None,
    weights_path: str | None = None,
) -> dict[str, float]:
    """`metrics` of generated uint8 clips (N, F, C, H, W) against the first `num_reference_clips` clips of `data`
    (a TrainData of clips, e.g. Moving Fashion-MNIST), per frame and over time:

    - "fid", "kid": Inception FID/KID of all N * F frames against all frames of the reference clips, the reference
      cached as `<data.key>-first<n>clips-frames`;
    - "classifier": `fd_classifier` of the frames likewise, and for one-item clips `class_consistency` (the share of
      clips whose every frame the classifier gives one class, that class the clip's label when `labels` are given)
      and, with labels, `class_accuracy` over frames;
    - always: `accel_generated`, `accel_real` (mean squared centroid acceleration, px^2 per frame^2, both tracked
      from pixels), `accel_ratio` (their ratio, 1 moves like real) and `frame_diff_ratio` (mean frame-to-frame
      change over that of real clips; 0 is still)."""
    reference_clips = functools.cache(lambda: data.dataset.uint8_clips(num_reference_clips))  # (n, F, C, H, W)
    reference_frames = lambda: reference_clips().flatten(0, 1)  # (n * F, C, H, W)
    if clips_uint8.shape[-2:] != reference_clips().shape[-2:]:
        raise ValueError(
            f"generated clips of {tuple(clips_uint8.shape[-2:])} px cannot be measured against reference clips of "
            f"{tuple(reference_clips().shape[-2:])} px: the motion is in pixels"
        )
    clips_uint8 = clips_uint8.cpu()
    frames = clips_uint8.flatten(0, 1)  # (N * F, C, H, W)
    key = f"{data.key}-first{num_reference_clips}clips-frames"
    values, classifier = _distribution_metrics(frames, key, reference_frames, metrics, features, weights_path)
    num_items = data.dataset.num_items
    if classifier is not None and num_items == 1:
        classes = frame_classes(clips_uint8, classifier, item_size_for(clips_uint8.shape[-1]))  # (N, F)
        values["class_consistency"] = class_consistency(classes, labels)
        if labels is not None:
            intended = torch.as_tensor(labels).long().cpu()[:, None]  # (N, 1): a clip's label holds for every frame
            values["class_accuracy"] = float((classes == intended).double().mean())
    values["accel_generated"] = mean_acceleration(clips_uint8, num_items)
    values["accel_real"] = mean_acceleration(reference_clips(), num_items)
    values["accel_ratio"] = float(torch.tensor(values["accel_generated"]) / values["accel_real"])  # inf, not raise
    values["frame_diff_ratio"] = frame_difference_ratio(clips_uint8, reference_clips())
    return values
