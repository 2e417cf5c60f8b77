"""From a dataset to training batches: the DataLoader every training run reads through, and the x0 that the
objective trains on (images, latents drawn from their stored posteriors, or a reflow teacher's samples)."""

from __future__ import annotations

import torch

from modules.data.images import collate_examples
from modules.data.latents import sample_latents
from modules.data.order import ResumableBatchSampler


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (B,C,H,W), or each clip of (B,F,C,H,W), horizontally with probability 1/2, drawn from
    `generator`."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device).view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)


class WithIndex(torch.utils.data.Dataset):
    """A dataset whose batches also carry the indices of their rows ("index"), to look up captions by."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):
        if hasattr(self.dataset, "__getitems__"):
            batch = collate_examples(self.dataset.__getitems__(indices))
        else:
            batch = collate_examples([self.dataset[i] for i in indices])
        return {**batch, "index": torch.as_tensor(indices, dtype=torch.long)}

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def model_input(batch: dict, data, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """The x0 the objective trains on: the batch's images, for a latent dataset a latent drawn from each stored
    posterior and normalised by the dataset's channel statistics, or a pairs dataset's samples as they are (paired
    with their noise, "noise"). `flip`: random horizontal flips."""
    if "x0" in batch:
        return batch["x0"]
    if "latent_mean" in batch:
        return sample_latents(batch, generator, data, flip)
    x0 = batch["pixel_values"]
    return random_flip(x0, generator) if flip else x0


def train_loader(
    dataset,
    sampler: ResumableBatchSampler,
    seed: int,
    num_workers: int = 0,
    with_index: bool = False,
    pin_memory=False,
) -> torch.utils.data.DataLoader:
    """The DataLoader a training run reads: the batches of `sampler` (which says where the run starts), collated in
    one index op where the dataset can; `with_index` adds each row's index (to look up its caption)."""
    return torch.utils.data.DataLoader(
        WithIndex(dataset) if with_index else dataset,
        batch_sampler=sampler,
        collate_fn=collate_examples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (dropout) untouched
    )
