"""What a training changes on a model the WebUI goes on using, and its exact undo.

Placement (device / dtype), frozen weights, train / eval modes and the blocks' own checkpoint flags are recorded
first and put back afterwards, so the state dict and the output stay bit-identical. LDM's own checkpointing (the
blocks' `checkpoint` / `use_checkpoint` flags) differentiates only the block's own parameters, which would lose the
LoRA gradients: it is switched off while training, and gradient checkpointing wraps the blocks' `_forward` in
`torch.utils.checkpoint` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")
WIDER = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # a cast to a higher rank is exact


@dataclass
class _Moved:
    """One parameter or buffer moved for training, with what restores it."""

    store: dict  # the owner's _parameters or _buffers
    key: str
    original: torch.Tensor | None  # kept when the cast loses precision; else recomputed by casting back
    device: torch.device
    dtype: torch.dtype


def _exact_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether casting source → target → source gives the same values."""
    return source == target or WIDER.get(source, 9) < WIDER.get(target, 0)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class _Overrides:
    """Instance attributes set for a while, each with what was there before (or that nothing was)."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        self._saved.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, old in reversed(self._saved):
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._saved.clear()


_ABSENT = object()


class TrainingState:
    """The training-time changes of `modules` (and of the UNet's checkpointing) with their exact undo."""

    def __init__(self, modules: list[nn.Module], unet: nn.Module) -> None:
        self._grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
        self._modes = [(m, m.training) for module in modules for m in module.modules()]
        self._flags = [
            (m, flag) for m in unet.modules() for flag in CHECKPOINT_FLAGS if isinstance(getattr(m, flag, None), bool)
        ]
        self._moved: list[_Moved] = []
        self._attributes, self._forwards = _Overrides(), _Overrides()

    def place(self, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        """Move `module`'s tensors to device, floating ones cast to dtype; only those not there already."""
        device = torch.empty(0, device=device).device  # resolved ("cuda" → "cuda:0")
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for key, tensor in store.items():
                    target = dtype if tensor is not None and tensor.is_floating_point() else None
                    if tensor is None or (tensor.device == device and (target is None or tensor.dtype == target)):
                        continue
                    moved = tensor.data.to(device, target or tensor.dtype)
                    keep = None if _exact_cast(tensor.dtype, moved.dtype) else tensor.data
                    self._moved.append(_Moved(store, key, keep, tensor.device, tensor.dtype))
                    _assign(store, key, moved)

    def override(self, obj: object, name: str, value: object) -> None:
        """Set an attribute until `restore` (e.g. the dtype an LDM UNet casts its input to)."""
        self._attributes.set(obj, name, value)

    def prepare(self) -> None:
        """Freeze every parameter, eval mode everywhere, LDM's own checkpointing off."""
        for parameter, _ in self._grads:
            parameter.requires_grad_(False)
        for module, _ in self._modes:
            module.training = False
        for module, flag in self._flags:
            self.override(module, flag, False)

    def set_checkpointing(self, enabled: bool) -> None:
        """Wrap (or unwrap) the forward of the UNet's transformer / resnet blocks in `torch.utils.checkpoint`."""
        self._forwards.undo()
        if enabled:
            blocks = dict.fromkeys(m for m, _ in self._flags if callable(getattr(m, "_forward", None)))
            for module in blocks:  # transformer / resnet blocks, each once
                self._forwards.set(module, "forward", _checkpointed(module._forward))

    def restore(self) -> None:
        """Everything as it was before: forwards, placement, requires_grad, modes, attributes."""
        self._forwards.undo()
        for moved in reversed(self._moved):
            current = moved.store[moved.key]
            original = moved.original if moved.original is not None else current.data.to(moved.device, moved.dtype)
            _assign(moved.store, moved.key, original)
        self._moved.clear()
        for parameter, flag in self._grads:
            parameter.requires_grad_(flag)
        for module, mode in self._modes:
            module.training = mode
        self._attributes.undo()


def _assign(store: dict, key: str, data: torch.Tensor) -> None:
    """Replace a buffer, or a parameter's data (the Parameter object, and so every reference to it, stays)."""
    tensor = store[key]
    if isinstance(tensor, nn.Parameter):
        tensor.data = data
    else:
        store[key] = data
