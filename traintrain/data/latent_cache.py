"""The latent cache on disk: one safetensors file per training sample, keyed by the sample's pixels (so by the image's
content, its bucket / resolution and mirroring) and by the VAE, so reruns and queued runs on a folder skip the VAE."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from traintrain.errors import TrainTrainError
from traintrain.files import atomic_path

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels (B,3,H,W) in [-1,1] → latents (B,4,H/8,W/8)
PROBE_SIZE = 64  # side of the fixed image whose encoding fingerprints the VAE


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG seeded with `seed` inside the block and restored after it (CUDA too)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class CachedEncoder:
    """Wraps a VAE encoder: each sample's latents are read from `folder` when cached, else encoded (with a seed taken
    from its key, so they do not depend on batching or on the global RNG) and written there."""

    def __init__(self, encode: Encoder, folder: Path, device: torch.device) -> None:
        self.encode, self.folder, self.device = encode, Path(folder), device
        self.hits = self.misses = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vae = self._fingerprint()

    def _fingerprint(self) -> str:
        """A digest of the VAE's encoding of a fixed image: another VAE or precision gives other cache keys."""
        probe = torch.linspace(-1, 1, 3 * PROBE_SIZE * PROBE_SIZE).reshape(1, 3, PROBE_SIZE, PROBE_SIZE)
        with _seeded(0, self.device):
            latents = self.encode(probe).float().cpu()
        return hashlib.sha256(latents.round(decimals=3).numpy().tobytes()).hexdigest()

    def key(self, pixels: torch.Tensor) -> str:
        """The cache key of one sample's pixels (3,H,W) under this VAE."""
        digest = hashlib.sha256(self.vae.encode())
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:40]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents (B,4,H/8,W/8) of a batch of pixels, from the cache where present."""
        return torch.cat([self._one(sample) for sample in pixels])

    def _one(self, pixels: torch.Tensor) -> torch.Tensor:
        key = self.key(pixels)
        path = self.folder / f"{key}.safetensors"
        if path.is_file():
            self.hits += 1
            return self._read(path).to(self.device)
        self.misses += 1
        with _seeded(int(key[:8], 16), self.device):
            latents = self.encode(pixels.unsqueeze(0)).detach()
        with atomic_path(path) as tmp:
            save_file({"latents": latents.float().cpu().contiguous()}, str(tmp), metadata={"vae": self.vae})
        return latents

    @staticmethod
    def _read(path: Path) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor("latents")
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise TrainTrainError(f"The cached latents {path} cannot be read ({error}): delete the file.") from error

    def summary(self) -> str:
        """How many samples came from the cache, for the log."""
        return f"latent cache {self.folder}: {self.hits} read, {self.misses} encoded"
