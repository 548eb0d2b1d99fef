"""Small device helpers for the hot path."""

from __future__ import annotations

import torch


def host_values_on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of Python values on `device`; on CUDA through pinned memory and a non-blocking copy, so building it
    never makes the host wait for the GPU queue."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
