"""Regularisation (class) images for prior preservation: batches drawn from them in proportion to their share."""

from __future__ import annotations

import torch

from traintrain.data.latents import Batch, LatentDataset


class RegularisedBatches:
    """Each batch comes from the regularisation images with probability reg / (train + reg), counting every sample
    with its repeats, else from the training images; without regularisation images every batch is a training one."""

    def __init__(self, train: LatentDataset, regularisation: LatentDataset | None) -> None:
        self.train, self.regularisation = train, regularisation
        reg = len(regularisation) if regularisation is not None else 0
        self.share = reg / (len(train) + reg)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Batch, bool]:
        """The next batch, and whether it is a regularisation batch; deterministic for a given generator state."""
        if self.regularisation is None:
            return self.train.sample_batch(batch_size, generator), False
        regular = float(torch.rand((), generator=generator, device=generator.device)) < self.share
        source = self.regularisation if regular else self.train
        return source.sample_batch(batch_size, generator), regular
