"""The training noise: Gaussian, optionally with an offset per image and channel and with pyramid (multires) noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseOptions:
    """Noise offset (0 = off), pyramid levels (0 = off) and the weight ratio between pyramid levels."""

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator, options: NoiseOptions = NoiseOptions()
) -> torch.Tensor:
    """Noise of `shape` (B,C,H,W) on the generator's device; with the defaults exactly one `torch.randn` draw."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if options.multires_iterations > 0:
        noise = pyramid_noise(noise, generator, options.multires_iterations, options.multires_discount)
    if options.offset > 0:
        offset = torch.randn((*shape[:2], 1, 1), generator=generator, device=generator.device)
        noise = noise + options.offset * offset
    return noise


def pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
) -> torch.Tensor:
    """`noise` plus up to `iterations` coarser Gaussian levels (level i shrunk by a random factor r^i, r in [2, 4),
    upsampled bilinearly, weighted discount^i), rescaled to unit standard deviation per sample."""
    batch, channels, height, width = noise.shape
    total = noise.clone()
    for level in range(1, iterations + 1):
        ratio = 2.0 + 2.0 * float(torch.rand((), generator=generator, device=generator.device))
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=generator.device)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**level
        if size == (1, 1):
            break
    return total / total.flatten(1).std(dim=1).view(-1, 1, 1, 1)
