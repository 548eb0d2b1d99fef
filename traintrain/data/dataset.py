"""The LoRA image dataset: every image's variants (main bucket, sub-image buckets, mirrored copies) with prompts.

Only what makes each variant is kept (file, bucket, mirroring, SDXL's size conditioning): pixels are made on demand,
one source image at a time, while the latent cache encodes them (`LatentDataset.build`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from traintrain.data.buckets import Bucket, bucket_order, nearest_buckets, needs_upscale
from traintrain.data.captions import image_prompt
from traintrain.data.files import discover_images
from traintrain.data.images import alpha_mask, cover_crop, fit_to_bucket, load_image, to_pixels
from traintrain.data.options import DataOptions
from traintrain.errors import TrainTrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One training variant of the image at `path`: its prompt, bucket, mirroring, the source's (height, width) and
    the (top, left) of its crop in the cover-resized image (as seen after mirroring): SDXL's size conditioning."""

    path: Path
    prompt: str
    bucket: Bucket
    original_size: tuple[int, int]
    crop: tuple[int, int]
    mirror: bool = False
    image: Image.Image | None = field(default=None, compare=False, repr=False)  # held when not the file as it is

    def render(self, image: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels (3,H,W) in [-1,1], alpha mask (1,H/8,W/8) or None) from `image` (default: `source()`)."""
        image = image if image is not None else self.source()
        fitted = fit_to_bucket(image, self.bucket)
        pixels, mask = to_pixels(fitted), alpha_mask(fitted)
        if self.mirror:
            return pixels.flip(-1), None if mask is None else mask.flip(-1)
        return pixels, mask

    def source(self) -> Image.Image:
        """The source image: the one held, else loaded again from `path`."""
        image = self.image if self.image is not None else load_image(self.path)
        if image is None:
            raise TrainTrainError(f"{self.path} could not be read any more: restore or remove it and start again.")
        return image

    @property
    def pixels(self) -> torch.Tensor:
        """The variant's pixels (3,H,W) in [-1,1]."""
        return self.render()[0]

    @property
    def mask(self) -> torch.Tensor | None:
        """The variant's alpha mask (1,H/8,W/8), None without transparency."""
        return self.render()[1]

    @property
    def size_conditioning(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's size ids: original (height, width), crop (top, left), target (height, width)."""
        return (*self.original_size, *self.crop, self.bucket[1], self.bucket[0])


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


def make_samples(
    path: Path,
    size: tuple[int, int],
    buckets: list[Bucket],
    prompt: str,
    mirroring: bool,
    image: Image.Image | None = None,
) -> list[Sample]:
    """One sample per bucket (cover-resized and centre-cropped) of the image at `path` of `size` (width, height), or
    of `image` when given (held in memory), each followed by its mirror when asked."""
    samples = []
    for bucket in buckets:
        (covered_width, _), (left, top) = cover_crop(size, bucket)
        sample = Sample(path, prompt, bucket, (size[1], size[0]), (top, left), image=image)
        mirrored = dataclasses.replace(sample, crop=(top, covered_width - bucket[0] - left), mirror=True)
        samples.extend([sample, mirrored] if mirroring else [sample])
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
    """Every image of `folder` (recursively) as bucketed samples (read once for its size; its pixels are made while
    encoding); corrupt files are skipped with a warning."""
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
        dataset.add(make_samples(path, image.size, buckets, prompt, options.mirroring))
    require_samples(dataset, folder, options)
    return dataset
