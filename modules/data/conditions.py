"""What a model is conditioned on, batch by batch: class labels (dropped for classifier-free guidance), captions
through a text encoder, or nothing; and the conditions of the images a preview or an evaluation generates."""

from __future__ import annotations

import torch

from modules.data.pairs import PairsData
from modules.networks.conditioning import drop_labels
from modules.pixels import to_model_range


class ConditionSource:
    """What the model is conditioned on, in training batches, previews and evaluation: class labels, captions
    through a text encoder (`text`, a modules.networks.text.TextConditioner), or nothing. Dropped labels become
    `null_label` (default num_classes: a pretrained model with more classes than the data has its own)."""

    def __init__(self, data, num_classes: int, text=None, drop_prob: float = 0.0, null_label: int | None = None):
        self.data, self.num_classes, self.text, self.drop_prob = data, num_classes, text, drop_prob
        self.null_label = num_classes if null_label is None else null_label

    def batch(self, batch: dict, generator: torch.Generator, device):
        """The condition of a training batch, with classifier-free-guidance dropout drawn from `generator`."""
        if self.text is not None:
            index = batch["index"].tolist()
            drop = torch.rand(len(index), generator=generator, device=generator.device).tolist()
            captions = ["" if u < self.drop_prob else self.data.captions[i] for u, i in zip(drop, index, strict=True)]
            return self.text(captions, device)
        if self.num_classes:
            return drop_labels(batch["labels"], self.drop_prob, self.null_label, generator)
        return None

    def for_images(self, n: int):
        """(cond, labels) for n generated images: cond is what they are generated from (labels cycling over the
        classes, or the captions of the first n training images), labels the classes they should show (or None)."""
        if self.text is not None:
            index = [i % len(self.data.captions) for i in range(n)]
            labels = getattr(self.data.dataset, "labels", None)
            labels = [int(labels[i]) for i in index] if labels is not None and self.data.num_classes else None
            return self.text([self.data.captions[i] for i in index], "cpu"), labels
        if self.num_classes:
            labels = [i % self.num_classes for i in range(n)]
            return labels, labels
        return None, None

    def null(self, device):
        """The unconditional condition of a text model (the empty caption's), for guidance; None otherwise."""
        return self.text.null(device) if self.text is not None else None

    def held_out(self, held_out) -> tuple[torch.Tensor, object, torch.Tensor | None]:
        """All held-out x0 with their condition and their noise, decoded once for every validation of the run: images
        in [-1, 1] (noise None: the validation draws it), or a pairs dataset's samples with the noise of each."""
        n, noise = len(held_out.dataset), None
        if isinstance(held_out, PairsData):
            pairs = held_out.dataset.__getitems__(list(range(n)))
            x0, noise = pairs["x0"], pairs["noise"]
        else:
            x0 = to_model_range(held_out.dataset.uint8_images(n))
        if self.text is not None:
            return x0, self.text(held_out.captions[:n], "cpu"), noise
        labels = held_out.dataset.labels if self.num_classes else None
        return x0, torch.as_tensor(labels[:n], dtype=torch.long) if labels is not None else None, noise
