"""One training step, split for speed: a mode draws the step's inputs (batch, noise, timesteps) on the host side, and
computes its loss from those tensors alone, so the compute can be compiled or captured as a CUDA graph."""

from __future__ import annotations

import contextlib
import copy
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
        max_grad_norm: float = 0.0,
        gradient_sync: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        self.loss, self.optimizer, self.autocast_dtype, self.device = loss, optimizer, autocast_dtype, device
        self.max_grad_norm = max_grad_norm  # 0: no clipping
        self.gradient_sync = gradient_sync  # e.g. the average over data-parallel ranks, run before each step
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
        loss = self.forward_backward(inputs)
        self.apply()
        return loss

    def forward_backward(self, inputs: StepInputs) -> torch.Tensor:
        """The loss and its gradients (scaled for fp16); the detached loss."""
        compute = self.compiled or self.loss
        with self.autocast():
            loss = compute(inputs)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach()

    def apply(self) -> None:
        """The optimizer step on the gradients there are (synced first when data-parallel; through the gradient
        scaler for fp16), their norm clipped to `max_grad_norm` first when set."""
        if self.gradient_sync is not None:
            self.gradient_sync(self.parameters())
        if self.max_grad_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def parameters(self) -> list[torch.Tensor]:
        """The trained parameters, in the optimizer's order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step changes: trained parameters, optimizer state, the gradient scaler's scale."""
        tensors = self.parameters()
        for state in self.optimizer.state.values():
            tensors += [value for _, value in sorted(state.items()) if isinstance(value, torch.Tensor)]
        if self.scaler is not None and self.scaler._scale is not None:
            tensors += [self.scaler._scale, self.scaler._growth_tracker]
        return tensors

    def snapshot(self) -> StepState:
        """A copy of everything a step changes, to put back with `restore`."""
        return StepState(self)


class StepState:
    """A copy of a step's state: its tensors (put back in place: a CUDA graph holds their addresses) and the plain
    values optimizers keep beside them (step counters, Prodigy's / D-Adaptation's d, ...)."""

    def __init__(self, step: OptimizerStep) -> None:
        self.step = step
        self.tensors = step.state_tensors()
        self.values = [t.detach().clone() for t in self.tensors]
        self.plain = _plain_values(step.optimizer)

    def restore(self) -> None:
        """Put the copied state back."""
        with torch.no_grad():
            for tensor, value in zip(self.tensors, self.values):
                tensor.copy_(value)
        optimizer = self.step.optimizer
        for param, values in self.plain["state"].items():
            optimizer.state[param].update(copy.deepcopy(values))
        for group, values in zip(optimizer.param_groups, self.plain["groups"]):
            group.update(copy.deepcopy(values))

    def changed(self) -> torch.Tensor:
        """The step's current tensors minus the copied ones, flattened (the update since the copy)."""
        return torch.cat([(t.detach() - v).float().flatten() for t, v in zip(self.tensors, self.values)])


def _plain_values(optimizer: torch.optim.Optimizer) -> dict:
    """Copies of the non-tensor values of the optimizer's per-parameter state and of its parameter groups (keyed by
    the parameters themselves, which are not copied)."""
    state = {
        param: copy.deepcopy({key: value for key, value in values.items() if not isinstance(value, torch.Tensor)})
        for param, values in optimizer.state.items()
    }
    groups = [
        copy.deepcopy({k: v for k, v in group.items() if k != "params" and not isinstance(v, torch.Tensor)})
        for group in optimizer.param_groups
    ]
    return {"state": state, "groups": groups}


class EagerSteps:
    """Plain PyTorch steps: one optimizer step, then the gradients are dropped."""

    def __init__(self, step: OptimizerStep) -> None:
        self.step = step

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        loss = self.step(inputs)
        self.step.optimizer.zero_grad(set_to_none=True)
        return loss


class AccumulatingSteps:
    """Gradient accumulation: every call adds one batch's gradients; every `count`-th call steps the optimizer on
    their sum and drops them (the step's loss divides each batch's loss by `count`, so the sum is their mean's)."""

    def __init__(self, step: OptimizerStep, count: int) -> None:
        self.step, self.count, self.calls = step, count, 0

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        loss = self.step.forward_backward(inputs)
        self.calls += 1
        if self.calls % self.count == 0:
            self.step.apply()
            self.step.optimizer.zero_grad(set_to_none=True)
        return loss
