"""Small device helpers for the hot path."""

from __future__ import annotations

from typing import Callable, Hashable

import torch


def host_values_on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of Python values on `device`; on CUDA through pinned memory and a non-blocking copy, so building it
    never makes the host wait for the GPU queue."""
    return host_tensor_on(device, torch.tensor(values, dtype=dtype))


def host_tensor_on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor moved to `device`, without waiting for the GPU queue (pinned memory, non-blocking copy)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ConstantCache:
    """Small tensors that depend only on a few Python values (e.g. SDXL's size conditioning), built once per key and
    kept on the device. Rebuilding them every step copies from host memory, which a CUDA graph capture must not do:
    the graph would read that host memory again at every replay, after it has been reused."""

    def __init__(self) -> None:
        self._tensors: dict[Hashable, torch.Tensor] = {}

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor for `key`, built (without autograd) the first time it is asked for."""
        if key not in self._tensors:
            with torch.no_grad():
                self._tensors[key] = build()
        return self._tensors[key]
