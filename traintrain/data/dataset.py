"""The LoRA image dataset: every image cut into its main bucket, sub-image buckets and mirrored copies, with prompts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from traintrain.data.buckets import Bucket, bucket_order, nearest_buckets, needs_upscale
from traintrain.data.captions import image_prompt
from traintrain.data.files import discover_images
from traintrain.data.images import alpha_mask, fit_to_bucket, load_image, to_pixels
from traintrain.data.options import DataOptions
from traintrain.errors import TrainTrainError

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training variant: pixels (3,H,W) in [-1,1], its prompt, its bucket and its alpha mask (1,H/8,W/8) or None."""

    pixels: torch.Tensor
    prompt: str
    bucket: Bucket
    mask: torch.Tensor | None = None

    def mirrored(self) -> "Sample":
        """The horizontally flipped copy (mask flipped too)."""
        mask = None if self.mask is None else self.mask.flip(-1)
        return Sample(self.pixels.flip(-1), self.prompt, self.bucket, mask)


@dataclass
class ImageDataset:
    """The variants of every usable image; `prompts` holds one prompt per source image, `repeats` is num multiply."""

    samples: list[Sample] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    repeats: int = 1
    skipped: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def add(self, samples: list[Sample]) -> None:
        """Add the variants of one source image (nothing when all were skipped)."""
        if samples:
            self.samples.extend(samples)
            self.prompts.append(samples[0].prompt)

    def bucket_counts(self) -> dict[Bucket, int]:
        """Variants per bucket (without repeats), buckets in ratio order."""
        counts: dict[Bucket, int] = {}
        for sample in self.samples:
            counts[sample.bucket] = counts.get(sample.bucket, 0) + 1
        return {bucket: counts[bucket] for bucket in sorted(counts, key=bucket_order)}


def choose_buckets(size: tuple[int, int], main: list[Bucket], sub: list[Bucket], options: DataOptions) -> list[Bucket]:
    """The nearest main bucket and the `sub image num` nearest sub buckets, minus those needing upscale if disabled."""
    chosen = nearest_buckets(size, main, 1) + nearest_buckets(size, sub, options.sub_image_num)
    if options.disable_upscale:
        chosen = [bucket for bucket in chosen if not needs_upscale(size, bucket)]
    return chosen


def make_samples(image: Image.Image, buckets: list[Bucket], prompt: str, mirroring: bool) -> list[Sample]:
    """One sample per bucket (cover-resized and centre-cropped), each followed by its mirror when asked."""
    samples = []
    for bucket in buckets:
        fitted = fit_to_bucket(image, bucket)
        sample = Sample(to_pixels(fitted), prompt, bucket, alpha_mask(fitted))
        samples.extend([sample, sample.mirrored()] if mirroring else [sample])
    return samples


def require_samples(dataset: ImageDataset, folder: str | Path, options: DataOptions) -> None:
    """An error when no image gave a sample, saying why."""
    if dataset.samples:
        return
    hints = []
    if dataset.skipped:
        hints.append(f"{len(dataset.skipped)} file(s) could not be read, replace them")
    if options.disable_upscale:
        hints.append("images smaller than their bucket were skipped, untick image disable upscale or lower image size")
    raise TrainTrainError(f"No usable training image in {folder}: {'; '.join(hints)}.")


def load_image_dataset(folder: str | Path, options: DataOptions) -> ImageDataset:
    """Load every image of `folder` (recursively) into bucketed samples; corrupt files are skipped with a warning."""
    main, sub = options.buckets()
    dataset = ImageDataset(repeats=options.num_multiply)
    for path in discover_images(folder):
        image = load_image(path)
        if image is None:
            dataset.skipped.append(path)
            continue
        buckets = choose_buckets(image.size, main, sub, options)
        if not buckets:
            log.warning("Skipping %s: it is smaller than its buckets and image disable upscale is on.", path)
        prompt = image_prompt(path, options.trigger_word, options.use_filename_as_tag)
        dataset.add(make_samples(image, buckets, prompt, options.mirroring))
    require_samples(dataset, folder, options)
    return dataset
