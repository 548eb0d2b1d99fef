"""The latent cache on disk: reused by a rerun (same losses, no VAE work), invalidated per image when the image
changes, and for every image when the resolution or the VAE changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from traintrain.data.latent_cache import CachedEncoder
from traintrain.demo import demo_config, write_sample_images
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training


def run(config, tmp: Path) -> tuple[list[float], int]:
    """The losses of a run with the cache in tmp/logs/latents, and how many samples the VAE encoded."""
    bundle = build_tiny("sd1")
    encoded = []
    encode = bundle.encode_images
    bundle.encode_images = lambda pixels: encoded.append(len(pixels)) or encode(pixels)  # type: ignore[method-assign]
    result = run_training(RunContext(config, bundle, OutputDirs(tmp / "Lora", tmp / "logs", tmp / "jsons")))
    return result.losses, sum(encoded) - 1  # the first encoding is the VAE fingerprint's probe


def test_rerun_reads_the_cache_and_changes_invalidate_it(tmp_path):
    images = write_sample_images(tmp_path / "images")
    config = dataclasses.replace(
        demo_config(images, iterations=3), logging_save_csv=False, cache_latents_to_disk=True, image_mirroring=True
    )
    first, encoded = run(config, tmp_path)
    assert encoded == 8  # four images and their mirrors
    files = sorted((tmp_path / "logs/latents").glob("*.safetensors"))
    assert len(files) == 8 and load_file(str(files[0]))["latents"].shape == (1, 4, 8, 8)
    again, encoded = run(config, tmp_path)
    assert encoded == 0 and again == first
    with Image.open(images / "red_circle.png") as image:
        changed = image.copy()
    changed.putpixel((3, 3), (0, 0, 0))
    changed.save(images / "red_circle.png")
    _, encoded = run(config, tmp_path)
    assert encoded == 2, "only the changed image (and its mirror) is encoded again"
    _, encoded = run(dataclasses.replace(config, image_size=(128, 128), image_buckets_step=128, image_min_length=128), tmp_path)
    assert encoded == 8, "another resolution is another key"
    uncached, encoded = run(dataclasses.replace(config, cache_latents_to_disk=False), tmp_path / "plain")
    assert encoded == 7 and not (tmp_path / "plain/logs/latents").exists()  # no probe without the cache


def test_another_vae_misses_and_cached_latents_do_not_depend_on_batching(tmp_path):
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def vae(scale: float):
        return lambda p: torch.nn.functional.avg_pool2d(p, 8)[:, :1].repeat(1, 4, 1, 1) * scale + torch.randn(
            len(p), 4, p.shape[-2] // 8, p.shape[-1] // 8
        ) * 0.1

    cache = CachedEncoder(vae(1.0), tmp_path, torch.device("cpu"))
    together = cache(pixels)
    assert cache.misses == 3 and cache.hits == 0
    fresh = CachedEncoder(vae(1.0), tmp_path / "other", torch.device("cpu"))
    one_by_one = torch.cat([fresh(pixels[i : i + 1]) for i in range(3)])
    assert torch.equal(together, one_by_one), "each sample is encoded with its own seed"
    assert torch.equal(CachedEncoder(vae(1.0), tmp_path, torch.device("cpu"))(pixels), together)
    other = CachedEncoder(vae(2.0), tmp_path, torch.device("cpu"))
    other(pixels)
    assert other.misses == 3 and other.hits == 0
