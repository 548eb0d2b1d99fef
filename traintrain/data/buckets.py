"""Bucket sets (width, height) from the image size, step, minimum length and maximum ratio, and nearest-ratio choice.

Nearest means the smallest |w/h - ratio| in exact arithmetic; a tie goes to the larger area, then the smaller ratio,
so that an image of ratio 0.8 prefers (384,640) (ratio 0.6, area 245760) over (384,384) (ratio 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

from traintrain.errors import TrainTrainError

Bucket = tuple[int, int]  # (width, height)
ImageSize = int | str | Sequence[int]

VAE_FACTOR = 8  # latents are 1/8 of the pixel size, so every side must be a multiple of 8


def parse_image_size(size: ImageSize) -> tuple[int, int]:
    """ "N" or "A,B" (or ints) → (short side, long side), each a positive multiple of 8."""
    if isinstance(size, str):
        parts = [p.strip() for p in size.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError as error:
            raise TrainTrainError(
                f"Image size {size!r} is not 'N' or 'height,width': type numbers like 768,512."
            ) from error
    elif isinstance(size, int):
        values = [size]
    else:
        values = [int(v) for v in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0 or any(v % VAE_FACTOR for v in values):
        raise TrainTrainError(
            f"Image size {size!r} must be one or two positive multiples of 8, such as 512 or 768,512."
        )
    short, long = sorted(values)
    return short, long


def _check_settings(step: int, min_length: int, max_ratio: float) -> None:
    if step <= 0 or step % VAE_FACTOR:
        raise TrainTrainError(f"Image buckets step is {step}: set a positive multiple of 8, such as 64 or 128.")
    if min_length <= 0 or min_length % VAE_FACTOR:
        raise TrainTrainError(f"Image min length is {min_length}: set a positive multiple of 8, such as 256 or 512.")
    if max_ratio < 1:
        raise TrainTrainError(f"Image max ratio is {max_ratio}: set a value of 1 or more, such as 2.")


def _ratio_ok(width: int, height: int, max_ratio: float) -> bool:
    return height > 0 and 1 / max_ratio <= width / height <= max_ratio


def bucket_order(bucket: Bucket) -> tuple[Fraction, int]:
    """Sort key: aspect ratio w/h ascending, then the larger area first."""
    width, height = bucket
    return Fraction(width, height), -width * height


def make_buckets(
    image_size: ImageSize, step: int, min_length: int, max_ratio: float
) -> tuple[list[Bucket], list[Bucket]]:
    """The main buckets and the sub-image buckets, each sorted by aspect ratio."""
    _check_settings(step, min_length, max_ratio)
    short, long = parse_image_size(image_size)
    max_pixels = short * long
    lengths = range(min_length, long + 1, step)
    main = {(short, short)}
    for width in lengths:
        height = min(long, max_pixels // width // step * step)
        if _ratio_ok(width, height, max_ratio):
            main.update({(width, height), (height, width)})
    sub = {
        (width, height)
        for width in lengths
        for height in lengths
        if width * height <= max_pixels and _ratio_ok(width, height, max_ratio) and (width, height) not in main
    }
    return sorted(main, key=bucket_order), sorted(sub, key=bucket_order)


def nearest_buckets(size: tuple[int, int], buckets: Sequence[Bucket], count: int) -> list[Bucket]:
    """The `count` buckets whose ratio is nearest to that of `size` (width, height), nearest first."""
    ratio = Fraction(size[0], size[1])

    def distance(bucket: Bucket) -> tuple[Fraction, int, Fraction]:
        own = Fraction(bucket[0], bucket[1])
        return abs(own - ratio), -bucket[0] * bucket[1], own

    return sorted(buckets, key=distance)[:count]


def needs_upscale(size: tuple[int, int], bucket: Bucket) -> bool:
    """Whether an image of `size` must be enlarged to cover `bucket`."""
    return bucket[0] > size[0] or bucket[1] > size[1]
