"""The latent cache: every sample VAE-encoded once, kept per bucket with its prompts and masks, served in batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from traintrain.devices import host_values_on
from traintrain.data.buckets import Bucket
from traintrain.data.dataset import ImageDataset, Sample
from traintrain.data.sampler import BucketSampler
from traintrain.errors import TrainTrainError

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels (B,3,H,W) in [-1,1] → latents (B,4,H/8,W/8)


@dataclass
class Batch:
    """Latents (B,4,h,w) of one bucket, their prompts, and masks (B,1,h,w) or None when no sample has alpha."""

    latents: torch.Tensor
    prompts: list[str]
    masks: torch.Tensor | None
    bucket: Bucket


@dataclass
class BucketLatents:
    """Everything cached for one bucket, in sample order."""

    latents: torch.Tensor
    prompts: list[str]
    masks: torch.Tensor | None


def checked_latents(latents: torch.Tensor) -> torch.Tensor:
    """`latents` when every value is finite; else an error saying what to change (the SDXL VAE overflows in fp16)."""
    if not bool(torch.isfinite(latents).all()):
        raise TrainTrainError(
            "The VAE encoded an image to NaN / inf latents (SDXL's VAE does in fp16): set 'train VAE precision' to "
            "fp32 (or bf16), or load a VAE made for fp16 (e.g. sdxl-vae-fp16-fix)."
        )
    return latents


def _encode(samples: list[Sample], encode: Encoder, batch_size: int) -> BucketLatents:
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    latents = torch.cat([encode(torch.stack([s.pixels for s in chunk])).detach() for chunk in chunks])
    masks = None
    if any(s.mask is not None for s in samples):
        ones = torch.ones(1, *latents.shape[-2:])
        masks = torch.stack([ones if s.mask is None else s.mask for s in samples]).to(latents.device)
    return BucketLatents(latents, [s.prompt for s in samples], masks)


class LatentDataset:
    """Cached latents per bucket and a sampler that never mixes buckets in a batch."""

    def __init__(self, buckets: dict[Bucket, BucketLatents], prompts: list[str], repeats: int = 1) -> None:
        self.buckets = buckets
        self.prompts = prompts  # one per source image: for the prompt cache and the tag frequency
        self.repeats = repeats
        self.sampler = BucketSampler({bucket: len(data.prompts) for bucket, data in buckets.items()}, repeats)

    @classmethod
    def build(cls, images: ImageDataset, encode: Encoder, batch_size: int = 4) -> "LatentDataset":
        """Encode every sample once (`batch_size` at a time), then free the pixels of `images`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        grouped: dict[Bucket, list[Sample]] = {bucket: [] for bucket in images.bucket_counts()}
        for sample in images.samples:
            grouped[sample.bucket].append(sample)
        buckets = {bucket: _encode(samples, encode, batch_size) for bucket, samples in grouped.items()}
        images.samples.clear()
        return cls(buckets, list(images.prompts), images.repeats)

    def __len__(self) -> int:
        return self.sampler.epoch_length

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Bucket, list[int]]:
        """The bucket and sample indices of the next batch (see `BucketSampler`)."""
        return self.sampler.draw(batch_size, generator)

    def gather(self, bucket: Bucket, indices: list[int]) -> Batch:
        """The batch made of `indices` of `bucket`."""
        data = self.buckets[bucket]
        index = host_values_on(data.latents.device, indices)
        masks = None if data.masks is None else data.masks[index]
        return Batch(data.latents[index], [data.prompts[i] for i in indices], masks, bucket)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The next batch: one bucket, `batch_size` samples, deterministic for a given generator state."""
        return self.gather(*self.draw(batch_size, generator))

    def summary(self) -> str:
        """Samples per bucket, for the verbose log."""
        parts = ", ".join(f"{w}x{h}: {len(data.prompts)}" for (w, h), data in self.buckets.items())
        repeats = f" (each repeated {self.repeats} times)" if self.repeats > 1 else ""
        total = sum(self.sampler.sizes.values())
        return f"{total} samples from {len(self.prompts)} images in {len(self.buckets)} buckets{repeats}: {parts}"
