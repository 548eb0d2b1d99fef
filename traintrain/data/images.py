"""Pillow work on one image: safe loading, cover-resize and centre crop, pixels in [-1,1], alpha mask at latent size.

Transparent pixels are composited over mid grey (127,127,127), which is about 0 in [-1,1]: neutral for the VAE. The
loss ignores them anyway through the alpha mask.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from traintrain.data.buckets import VAE_FACTOR, Bucket

log = logging.getLogger(__name__)

BACKGROUND = (127, 127, 127)
ALPHA_THRESHOLD = 0.1  # a latent pixel is trained where the image's alpha is above this


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def load_image(path: Path) -> Image.Image | None:
    """The image upright (EXIF orientation) as RGB, or RGBA when it has transparency; None (and a warning) if corrupt."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = _eight_bit(ImageOps.exif_transpose(opened))
            return image.convert("RGBA" if _has_alpha(image) else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        log.warning("Skipping %s: it is not a readable image (%s).", path, error)
        return None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale as 8-bit "L" with the same brightness (Pillow's own conversion
    clips them: a 16-bit image turns almost white, a 0..1 float one black); other modes unchanged.

    Raises ValueError for values that have no 8-bit meaning (negative, or floats above 255: HDR)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not (np.isfinite(values).all() and low >= 0 and high <= 255):
            raise ValueError(f"float pixels from {low:g} to {high:g} are not 0..1 or 0..255 (HDR is not supported)")
        peak = 1.0 if high <= 1.0 else 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"integer pixels from {low:g} to {high:g} are not 8 or 16 bit")
        peak = 65535.0
    return Image.fromarray(np.round(values * (255.0 / peak)).astype(np.uint8), mode="L")


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resized to (width, height): LANCZOS when shrinking, BICUBIC when enlarging."""
    if image.size == tuple(size):
        return image
    shrinking = size[0] * size[1] <= image.width * image.height
    return image.resize(size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)


def cover_crop(size: tuple[int, int], bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image of `size` (width, height): the (width, height) that just covers the bucket with the aspect kept,
    and the (left, top) of the centred bucket-size crop in it."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    covered = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return covered, ((covered[0] - width) // 2, (covered[1] - height) // 2)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resized to just cover the bucket (aspect kept), then centre-cropped to exactly (width, height)."""
    covered, (left, top) = cover_crop(image.size, bucket)
    return resize(image, covered).crop((left, top, left + bucket[0], top + bucket[1]))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB float tensor (3,H,W) in [-1,1]; an RGBA image is composited over the grey background first."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """The inverse of `to_pixels`: a (3,H,W) tensor in [-1,1] as an RGB image (clamped, rounded to 8 bits)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def alpha_mask(image: Image.Image) -> torch.Tensor | None:
    """For an RGBA image, (1,H/8,W/8) float 0/1: alpha > 0.1, downsampled with nearest neighbour; else None."""
    if image.mode != "RGBA":
        return None
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    opaque = torch.from_numpy(alpha > ALPHA_THRESHOLD).float()[None, None]
    size = (image.height // VAE_FACTOR, image.width // VAE_FACTOR)
    return F.interpolate(opaque, size=size, mode="nearest")[0]
