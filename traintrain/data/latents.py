"""The latent cache: every sample VAE-encoded once, kept per bucket with its prompts, masks and SDXL size ids.

Built as a stream: one source image at a time is decoded, cut into its variants and encoded; only the latents
(float16, on the encoder's device) stay.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from traintrain.devices import host_values_on
from traintrain.data.buckets import Bucket
from traintrain.data.dataset import ImageDataset, Sample
from traintrain.data.sampler import BucketSampler
from traintrain.errors import TrainTrainError

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels (B,3,H,W) in [-1,1] → latents (B,4,H/8,W/8)
STORED_DTYPE = torch.float16  # cached latents: half the memory of float32, well within their precision


@dataclass
class Batch:
    """Latents (B,4,h,w) float32 of one bucket, their prompts, masks (B,1,h,w) or None when no sample has alpha, and
    SDXL's size ids (B,6): original height / width, crop top / left, target height / width, in pixels."""

    latents: torch.Tensor
    prompts: list[str]
    masks: torch.Tensor | None
    bucket: Bucket
    sizes: torch.Tensor


@dataclass
class BucketLatents:
    """Everything cached for one bucket, in sample order (latents in `STORED_DTYPE`, size ids float32 on the CPU)."""

    latents: torch.Tensor
    prompts: list[str]
    masks: torch.Tensor | None
    sizes: torch.Tensor


def checked_latents(latents: torch.Tensor) -> torch.Tensor:
    """`latents` when every value is finite; else an error saying what to change (the SDXL VAE overflows in fp16)."""
    if not bool(torch.isfinite(latents).all()):
        raise TrainTrainError(
            "The VAE encoded an image to NaN / inf latents (SDXL's VAE does in fp16): set 'train VAE precision' to "
            "fp32 (or bf16), or load a VAE made for fp16 (e.g. sdxl-vae-fp16-fix)."
        )
    return latents


class _BucketBuilder:
    """The latents, prompts, masks and size ids of one bucket as they are encoded."""

    def __init__(self) -> None:
        self.latents: list[torch.Tensor] = []
        self.samples: list[Sample] = []
        self.masks: list[torch.Tensor | None] = []

    def add(self, samples: list[Sample], latents: torch.Tensor, masks: list[torch.Tensor | None]) -> None:
        self.latents.append(checked_latents(latents.detach()).to(STORED_DTYPE))
        self.samples.extend(samples)
        self.masks.extend(masks)

    def finish(self) -> BucketLatents:
        latents = torch.cat(self.latents)
        masks = None
        if any(mask is not None for mask in self.masks):
            ones = torch.ones(1, *latents.shape[-2:])
            masks = torch.stack([ones if m is None else m for m in self.masks]).to(latents.device)
        sizes = torch.tensor([s.size_conditioning for s in self.samples], dtype=torch.float32)
        return BucketLatents(latents, [s.prompt for s in self.samples], masks, sizes)


def _encode_stream(samples: list[Sample], encode: Encoder, batch_size: int) -> dict[Bucket, BucketLatents]:
    """Each source image decoded once; its variants of one bucket encoded together, `batch_size` at a time."""
    builders: dict[Bucket, _BucketBuilder] = {}
    for _, variants in itertools.groupby(samples, key=lambda s: (s.path, id(s.image))):
        variants = list(variants)
        image = variants[0].source()
        for bucket, group in itertools.groupby(variants, key=lambda s: s.bucket):
            group = list(group)
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                rendered = [sample.render(image) for sample in chunk]
                latents = encode(torch.stack([pixels for pixels, _ in rendered]))
                builders.setdefault(bucket, _BucketBuilder()).add(chunk, latents, [mask for _, mask in rendered])
    return {bucket: builder.finish() for bucket, builder in builders.items()}


class LatentDataset:
    """Cached latents per bucket and a sampler that never mixes buckets in a batch."""

    def __init__(self, buckets: dict[Bucket, BucketLatents], prompts: list[str], repeats: int = 1) -> None:
        self.buckets = buckets
        self.prompts = prompts  # one per source image: for the prompt cache and the tag frequency
        self.repeats = repeats
        self.sampler = BucketSampler({bucket: len(data.prompts) for bucket, data in buckets.items()}, repeats)

    @classmethod
    def build(cls, images: ImageDataset, encode: Encoder, batch_size: int = 4) -> "LatentDataset":
        """Encode every sample once, streaming (see the module docstring); `images` is emptied."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        encoded = _encode_stream(images.samples, encode, batch_size)
        buckets = {bucket: encoded[bucket] for bucket in images.bucket_counts()}  # ratio order, as before
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
        sizes = data.sizes[torch.tensor(indices)]
        return Batch(data.latents[index].float(), [data.prompts[i] for i in indices], masks, bucket, sizes)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The next batch: one bucket, `batch_size` samples, deterministic for a given generator state."""
        return self.gather(*self.draw(batch_size, generator))

    def summary(self) -> str:
        """Samples per bucket, for the verbose log."""
        parts = ", ".join(f"{w}x{h}: {len(data.prompts)}" for (w, h), data in self.buckets.items())
        repeats = f" (each repeated {self.repeats} times)" if self.repeats > 1 else ""
        total = sum(self.sampler.sizes.values())
        return f"{total} samples from {len(self.prompts)} images in {len(self.buckets)} buckets{repeats}: {parts}"
