"""Multi-ADDifT pairs: `X.ext` with `X<suffix>.ext` from one folder, bucketed alike and cached side by side.

Both images of a pair get the same bucket, crop, sub-images and mirroring, so sample i of the originals is aligned
with sample i of the targets. The batch masks are the original's alpha masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from traintrain.data.buckets import Bucket
from traintrain.data.captions import image_prompt
from traintrain.data.dataset import ImageDataset, choose_buckets, make_samples, require_samples
from traintrain.data.files import discover_images
from traintrain.data.images import load_image, resize
from traintrain.data.latents import Encoder, LatentDataset
from traintrain.data.options import DataOptions
from traintrain.errors import TrainTrainError

log = logging.getLogger(__name__)


def _partner(path: Path, suffix: str, by_name: dict[tuple[Path, str], list[Path]]) -> Path | None:
    """`path`'s target: same folder, stem + suffix, the same extension preferred (case-insensitive)."""
    candidates = by_name.get((path.parent, path.stem + suffix), [])
    same_extension = [c for c in candidates if c.suffix.lower() == path.suffix.lower()]
    return (same_extension or candidates or [None])[0]


def match_pairs(paths: list[Path], suffix: str) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(original, target) pairs and the originals without a target; a file that is some file's target is no original."""
    if not suffix:
        raise TrainTrainError("Diff target name is empty: set the suffix of the target images, such as _closed_eyes.")
    by_name: dict[tuple[Path, str], list[Path]] = {}
    for path in paths:
        by_name.setdefault((path.parent, path.stem), []).append(path)
    partners = {path: _partner(path, suffix, by_name) for path in paths}
    targets = {partner for partner in partners.values() if partner is not None}
    pairs: list[tuple[Path, Path]] = []
    unmatched: list[Path] = []
    for path, partner in partners.items():
        if path in targets:
            continue
        if partner is None:
            unmatched.append(path)
        else:
            pairs.append((path, partner))
    return pairs, unmatched


def same_size(original: Image.Image, target: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Both images resized (LANCZOS) to (min width, min height) when their sizes differ."""
    if original.size == target.size:
        return original, target
    size = (min(original.width, target.width), min(original.height, target.height))
    return resize(original, size), resize(target, size)


@dataclass
class PairDataset:
    """Aligned original and target samples, the pair files used and the originals that had no target."""

    originals: ImageDataset
    targets: ImageDataset
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.originals)


def load_pair_dataset(folder: str | Path, suffix: str, options: DataOptions) -> PairDataset:
    """Find the pairs of `folder` and cut both sides alike into bucketed samples with their own prompts."""
    main, sub = options.buckets()
    pairs, unmatched = match_pairs(discover_images(folder), suffix)
    if unmatched:
        log.warning("No %r target for %d image(s): %s", suffix, len(unmatched), ", ".join(p.name for p in unmatched))
    if not pairs:
        raise TrainTrainError(
            f"No image pair in {folder}: for image1.png add image1{suffix}.png, or fix the diff target name."
        )
    dataset = PairDataset(ImageDataset(repeats=options.num_multiply), ImageDataset(repeats=options.num_multiply))
    for original_path, target_path in pairs:
        original, target = load_image(original_path), load_image(target_path)
        if original is None or target is None:
            dataset.originals.skipped.append(original_path if original is None else target_path)
            continue
        original, target = same_size(original, target)
        buckets = choose_buckets(original.size, main, sub, options)
        if not buckets:
            log.warning("Skipping %s: it is smaller than its buckets and image disable upscale is on.", original_path)
            continue
        for side, path, image in ((dataset.originals, original_path, original), (dataset.targets, target_path, target)):
            prompt = image_prompt(path, options.trigger_word, options.use_filename_as_tag)
            side.add(make_samples(path, image.size, buckets, prompt, options.mirroring, image))  # resized alike: held
        dataset.pairs.append((original_path, target_path))
    dataset.unmatched = unmatched
    require_samples(dataset.originals, folder, options)
    return dataset


@dataclass
class PairBatch:
    """Aligned original and target latents of one bucket, their prompts, and the originals' masks or None."""

    original_latents: torch.Tensor
    target_latents: torch.Tensor
    original_prompts: list[str]
    target_prompts: list[str]
    masks: torch.Tensor | None
    bucket: Bucket


class PairedLatentDataset:
    """Two latent caches with one shared sampler, so every batch takes the same samples from both sides."""

    def __init__(self, originals: LatentDataset, targets: LatentDataset) -> None:
        self.originals, self.targets = originals, targets
        self.prompts = originals.prompts + targets.prompts  # every prompt a batch can hold

    @classmethod
    def build(cls, pairs: PairDataset, encode: Encoder, batch_size: int = 4) -> "PairedLatentDataset":
        """Encode both sides once, then free their pixels."""
        return cls(
            LatentDataset.build(pairs.originals, encode, batch_size),
            LatentDataset.build(pairs.targets, encode, batch_size),
        )

    def __len__(self) -> int:
        return len(self.originals)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> PairBatch:
        """The next batch of aligned pairs (one bucket), deterministic for a given generator state."""
        bucket, indices = self.originals.draw(batch_size, generator)
        original, target = self.originals.gather(bucket, indices), self.targets.gather(bucket, indices)
        return PairBatch(original.latents, target.latents, original.prompts, target.prompts, original.masks, bucket)

    def summary(self) -> str:
        """Pairs per bucket, for the verbose log."""
        return "pairs: " + self.originals.summary()
