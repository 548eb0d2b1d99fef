"""One training step, split for speed: a mode draws the step's inputs (batch, noise, timesteps) on the host side, and
computes its loss from those tensors alone, so the compute can be compiled or captured as a CUDA graph."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass
class StepInputs:
    """One step's tensors, all on the model's device, and its variant: whatever besides the tensors' shapes changes
    the work the loss does (e.g. ADDifT's even / odd steps). Equal signatures mean identical kernels."""

    tensors: dict[str, torch.Tensor]
    variant: Hashable = None

    def signature(self) -> tuple:
        """(variant, name / shape / dtype of every tensor): one CUDA graph per signature."""
        shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(self.tensors.items()))
        return self.variant, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        """The tensor `name`, None when the step has none (e.g. no mask)."""
        return self.tensors.get(name)


@dataclass
class TrainingStep:
    """A mode's step. `inputs(index)` draws everything random or host-side; `loss(inputs)` only computes on the
    device from those tensors (no host reads, no new host data, same Python path for the same signature)."""

    inputs: Callable[[int], StepInputs]
    loss: Callable[[StepInputs], torch.Tensor]


def tensors_without_none(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The keyword tensors that are not None (optional inputs such as masks or SDXL's pooled text)."""
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


class OptimizerStep:
    """Loss under autocast, backward (through the gradient scaler for fp16), optimizer step; gradients are left
    for the caller (eager: cleared after, CUDA graph: written by the captured backward)."""

    def __init__(
        self,
        loss: Callable[[StepInputs], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        autocast_dtype: torch.dtype | None,
        device: torch.device,
        *,
        compile: bool = False,
    ) -> None:
        self.loss, self.optimizer, self.autocast_dtype, self.device = loss, optimizer, autocast_dtype, device
        self.compiled = torch.compile(loss, dynamic=False) if compile else None
        fp16_on_cuda = autocast_dtype is torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_on_cuda else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on CUDA; the cast cache is off, as CUDA graph capture requires."""
        if self.autocast_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        """One optimizer step on `inputs`; the detached loss."""
        compute = self.compiled or self.loss
        with self.autocast():
            loss = compute(inputs)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: trained parameters, optimizer state, the gradient scaler's scale."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        for state in self.optimizer.state.values():
            tensors += [value for _, value in sorted(state.items()) if isinstance(value, torch.Tensor)]
        if self.scaler is not None and self.scaler._scale is not None:
            tensors += [self.scaler._scale, self.scaler._growth_tracker]
        return tensors


class EagerSteps:
    """Plain PyTorch steps: one optimizer step, then the gradients are dropped."""

    def __init__(self, step: OptimizerStep) -> None:
        self.step = step

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        loss = self.step(inputs)
        self.step.optimizer.zero_grad(set_to_none=True)
        return loss
