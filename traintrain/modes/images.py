"""The two images of Difference and ADDifT: loaded at native size (cropped to multiples of 8), checked, encoded once."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from traintrain.data.images import alpha_mask, load_image, to_pixels
from traintrain.errors import TrainTrainError
from traintrain.files import is_file
from traintrain.models.bundle import ModelBundle


def _open(path: Path, role: str) -> Image.Image:
    if not is_file(path):
        raise TrainTrainError(f"The {role} image {path} does not exist: choose an image file.")
    image = load_image(path)
    if image is None:
        raise TrainTrainError(f"The {role} image {path.name} cannot be read: choose a PNG, JPEG or WebP image.")
    width, height = (image.width // 8) * 8, (image.height // 8) * 8
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def encode_image_pair(
    bundle: ModelBundle, original_path: Path, target_path: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Latents (1,4,h,w) of the original and target image (same size required) and the original's alpha mask."""
    original, target = _open(Path(original_path), "original"), _open(Path(target_path), "target")
    if original.size != target.size:
        raise TrainTrainError(
            f"The original image is {original.width}x{original.height} but the target is "
            f"{target.width}x{target.height}: use two images of the same size."
        )
    if min(original.size) < 64:
        raise TrainTrainError("The images are smaller than 64 pixels on a side: use larger images.")
    pixels = torch.stack([to_pixels(original), to_pixels(target)]).to(bundle.device)
    with torch.no_grad():
        latents = bundle.encode_images(pixels)
    mask = alpha_mask(original)
    return latents[:1], latents[1:], None if mask is None else mask[None].to(bundle.device)
