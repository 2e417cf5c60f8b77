"""The order of the data and the randomness of each step, as pure functions of where the run is.

Epoch e of the data is a permutation seeded by (seed, e), split between processes; the random numbers of micro-batch
m of step s on process r come from a generator seeded by (seed, r, s, m). So a resumed run reads and draws exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import torch

from modules.config import UserError


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields batches of indices forever. Epoch e is a permutation seeded by (seed, e); rank r takes every
    world_size-th index of it. Starting at `start_batch` skips exactly what an earlier run consumed."""

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.batches_per_epoch = (num_items // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"{num_items} training images are fewer than one batch per process "
                f"(train_batch_size {batch_size} x {world_size} processes); lower --train_batch_size"
            )

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_items, generator=g)
        per_rank = self.num_items // self.world_size
        return perm[self.rank :: self.world_size][:per_rank]

    def __iter__(self):
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch, offset = epoch + 1, 0


def keyed_generator(key: tuple[int, ...], device="cpu") -> torch.Generator:
    """A generator seeded by a tuple of integers alone (their hash is the same in every process and run)."""
    return torch.Generator(device=device).manual_seed(hash(key) & ((1 << 63) - 1))


def step_generator(seed: int, rank: int, step: int, micro: int, device) -> torch.Generator:
    """The generator for one micro-batch: a pure function of where the run is, so resume replays it exactly."""
    return keyed_generator((seed, rank, step, micro), device)
