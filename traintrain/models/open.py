"""Open the model a standalone run trains on: a tiny built-in model, a single-file checkpoint or a diffusers folder."""

from __future__ import annotations

from pathlib import Path

import torch

from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelBundle
from traintrain.models.int8 import INT8, quantize_int8
from traintrain.precision import weight_dtype

TINY_MODELS = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_model(
    model: str, *, vae: str = "", v_pred: bool = False, precision: str = "fp16", device: torch.device | None = None
) -> ModelBundle:
    """A ModelBundle for `model`: 'tiny' / 'tiny-sd2' / 'tiny-sdxl', a .safetensors/.ckpt file or a diffusers folder."""
    from traintrain.models.diffusers_backend import DiffusersBundle

    device = device or default_device()
    dtype = weight_dtype(precision, device)
    if model in TINY_MODELS:
        from traintrain.models.tiny import build_tiny_components

        components = build_tiny_components(TINY_MODELS[model])
        if v_pred:
            components.prediction = "v"
    else:
        from traintrain.models.checkpoint import load_checkpoint

        if not model:
            raise TrainTrainError("No model given: pass --model with a checkpoint file, a diffusers folder or 'tiny'.")
        components = load_checkpoint(Path(model), vae_path=Path(vae) if vae else None, v_pred=v_pred or None)
    if precision == INT8:
        quantize_int8(components.unet)
    return DiffusersBundle(components, device=device, dtype=dtype)
