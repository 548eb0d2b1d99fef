"""Precision names of the settings (fp32 / fp16 / bf16 / model) → torch dtypes, in one place."""

from __future__ import annotations

import torch

# "model" means fp16, as in the original TrainTrain; "int8" (int8 UNet weights, models/int8.py) computes in fp16.
DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "model": torch.float16, "int8": torch.float16
}  # fmt: skip


def precision_dtype(name: str) -> torch.dtype:
    """The dtype of a precision setting."""
    return DTYPES[name]


def weight_dtype(model_precision: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen weights: the model precision on a GPU, fp32 on the CPU (half precision is slow there)."""
    return torch.float32 if device.type == "cpu" else precision_dtype(model_precision)


def autocast_dtype(model_precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype on CUDA from the model precision; None (no autocast) on the CPU or for fp32."""
    if device.type != "cuda" or model_precision == "fp32":
        return None
    return precision_dtype(model_precision)
