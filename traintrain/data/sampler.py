"""Which samples make the next batch: one bucket per batch, epoch-style shuffled order, seeded by a torch.Generator.

Each epoch every bucket gets a shuffled queue of its sample indices (each index `repeats` times). A batch takes the
head of one queue, the bucket picked at random weighted by what its queue still holds. A queue shorter than the batch
is topped up from a fresh shuffle of the bucket (repeating samples only when the bucket is smaller than the batch).
When every queue is empty a new epoch starts.
"""

from __future__ import annotations

import torch

from traintrain.data.buckets import Bucket


def _permutation(count: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(count, generator=generator, device=generator.device).tolist()


class BucketSampler:
    """Draws (bucket, sample indices) for batches; deterministic for a given generator state."""

    def __init__(self, sizes: dict[Bucket, int], repeats: int = 1) -> None:
        self.sizes = {bucket: size for bucket, size in sizes.items() if size > 0}
        self.repeats = repeats
        self.queues: dict[Bucket, list[int]] = {bucket: [] for bucket in self.sizes}
        if not self.sizes:
            raise ValueError("A sampler needs at least one non-empty bucket.")

    @property
    def epoch_length(self) -> int:
        """Indices drawn per epoch: every sample `repeats` times."""
        return sum(self.sizes.values()) * self.repeats

    def _new_epoch(self, generator: torch.Generator) -> None:
        for bucket, size in self.sizes.items():
            self.queues[bucket] = [i % size for i in _permutation(size * self.repeats, generator)]

    def _pick_bucket(self, generator: torch.Generator) -> Bucket:
        remaining = [(bucket, len(queue)) for bucket, queue in self.queues.items() if queue]
        point = torch.rand((), generator=generator, device=generator.device).item() * sum(n for _, n in remaining)
        for bucket, count in remaining:
            point -= count
            if point < 0:
                return bucket
        return remaining[-1][0]

    def _top_up(self, bucket: Bucket, taken: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
        order = _permutation(self.sizes[bucket], generator)
        batch = taken + [i for i in order if i not in taken]
        while len(batch) < batch_size:
            batch += order
        return batch[:batch_size]

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Bucket, list[int]]:
        """The bucket and the `batch_size` sample indices of the next batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if not any(self.queues.values()):
            self._new_epoch(generator)
        bucket = self._pick_bucket(generator)
        queue = self.queues[bucket]
        taken, self.queues[bucket] = queue[:batch_size], queue[batch_size:]
        if len(taken) < batch_size:
            taken = self._top_up(bucket, taken, batch_size, generator)
        return bucket, taken
