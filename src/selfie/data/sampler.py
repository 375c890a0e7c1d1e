"""Data order and per-step randomness as pure functions of (seed, step).

Nothing here keeps state, so a resumed run draws exactly the batches, crops, flips and masks
the uninterrupted run would have drawn from the same step on.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stream, step, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, step: int, device: torch.device | str, stream: int = 0):
    """A generator for one step's augmentation and masks, on the device that uses it."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, stream, step))
    return g


class EpochSampler:
    """Batches of indices: a fresh permutation each epoch, the last partial batch dropped.

    `batch(step)` is the index tensor of the step-th batch counted from the start of training.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        if batch_size > num_items:
            raise ValueError(f"batch size {batch_size} exceeds the {num_items} items")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = num_items // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch))
            self._order = torch.randperm(self.num_items, generator=g)
            self._epoch = epoch
        return self._order[i * self.batch_size : (i + 1) * self.batch_size]
