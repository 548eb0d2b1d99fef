"""The Image tab's augmentation: variants of an image by random rotation and down-scaling on a transparent canvas."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from PIL import Image

from traintrain.errors import TrainTrainError
from traintrain.files import atomic_path, inside, is_dir

SIDES = ("none", "right", "left", "top", "bottom")
MAX_VARIANTS = 1000  # per image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 has Image.Resampling; older names were removed in 10


@dataclass(frozen=True)
class AugmentSettings:
    """How many variants, and how each is turned, shrunk and placed."""

    count: int = 5
    rotate: bool = True
    max_angle: float = 180.0
    scale: bool = True
    min_scale: float = 0.4
    side: str = "none"
    seed: int = 0

    def validate(self) -> None:
        """Raise a TrainTrainError naming the setting to change."""
        if not 0 <= self.count <= MAX_VARIANTS:
            raise TrainTrainError(f"'number of images' must be from 0 to {MAX_VARIANTS}.")
        if not 0 <= self.max_angle <= 180:
            raise TrainTrainError("'max tilting angle' must be between 0 and 180 degrees.")
        if not 0 < self.min_scale <= 1:
            raise TrainTrainError("'minimum downscale ratio' must be above 0 and at most 1.")
        if self.side not in SIDES:
            raise TrainTrainError(f"'fix side' must be one of {', '.join(SIDES)}.")


def variants(image: Image.Image, settings: AugmentSettings) -> list[Image.Image]:
    """`settings.count` RGBA images of the original size; the same seed gives the same images."""
    return list(iter_variants(image, settings))


def iter_variants(image: Image.Image, settings: AugmentSettings) -> Iterator[Image.Image]:
    """The variants one at a time (only one is held in memory); the settings are checked before the first."""
    settings.validate()
    return _each_variant(image.convert("RGBA"), settings)


def _each_variant(source: Image.Image, settings: AugmentSettings) -> Iterator[Image.Image]:
    rng = random.Random(settings.seed)
    for _ in range(settings.count):
        yield _variant(source, settings, rng)


def _variant(source: Image.Image, settings: AugmentSettings, rng: random.Random) -> Image.Image:
    width, height = source.size
    turned = source
    if settings.rotate and settings.max_angle > 0:
        angle = rng.uniform(-settings.max_angle, settings.max_angle)
        turned = source.rotate(angle, resample=_RESAMPLING.BICUBIC, expand=True)
    factor = min(width / turned.width, height / turned.height, 1.0)
    if settings.scale:
        factor *= rng.uniform(settings.min_scale, 1.0)
    size = (max(1, round(turned.width * factor)), max(1, round(turned.height * factor)))
    if size != turned.size:
        turned = turned.resize(size, resample=_RESAMPLING.LANCZOS)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    canvas.alpha_composite(turned, _position(turned.size, (width, height), settings.side, rng))
    return canvas


def _position(size: tuple[int, int], canvas: tuple[int, int], side: str, rng: random.Random) -> tuple[int, int]:
    """Top-left corner: random, or flush against the chosen side (random along it)."""
    free_x, free_y = canvas[0] - size[0], canvas[1] - size[1]
    x, y = rng.randint(0, free_x), rng.randint(0, free_y)
    placed = {"right": (free_x, y), "left": (0, y), "top": (x, 0), "bottom": (x, free_y)}
    return placed.get(side, (x, y))


def save_variants(image: Image.Image, stem: str, out_dir: Path, settings: AugmentSettings) -> list[Path]:
    """Write the variants as `<stem>_id_<i>.png` into `out_dir` (always PNG, so the transparency survives)."""
    if not stem.strip():
        raise TrainTrainError("Give an output name for the images.")
    paths = []
    for i, variant in enumerate(iter_variants(image, settings)):
        path = inside(Path(out_dir), f"{stem.strip()}_id_{i}.png")
        with atomic_path(path) as tmp:
            variant.save(tmp, format="PNG")
        paths.append(path)
    return paths


def augment_file(path: Path, out_dir: Path, settings: AugmentSettings) -> list[Path]:
    """Variants of one image file, named after it."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise TrainTrainError(f"Cannot open image {path}: {error}. Choose a PNG, JPEG or WebP file.") from error
    return save_variants(image, Path(path).stem, out_dir, settings)


def augment_folder(folder: Path, settings: AugmentSettings) -> list[Path]:
    """Variants of every image in `folder` (not recursive), written to `<folder>/modified/`."""
    folder = Path(folder)
    if not is_dir(folder):
        raise TrainTrainError(f"{folder} is not a folder: give the folder that holds the images.")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise TrainTrainError(f"No PNG, JPEG or WebP images in {folder}.")
    out_dir = folder / "modified"
    return [
        saved
        for index, path in enumerate(images)
        for saved in augment_file(path, out_dir, replace(settings, seed=settings.seed + index))
    ]
