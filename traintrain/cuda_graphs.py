"""Training steps replayed as CUDA graphs: one capture per step signature (forward, backward and, for fused AdamW /
Adam, the optimizer step; other optimizers step eagerly on the gradients the replay wrote).

An eager PyTorch LoRA step is bound by the host launching thousands of small kernels; a replayed graph launches them
all at once. Each new signature (bucket shape, step variant) first runs a few eager steps (lazy initialisation:
optimizer state, cuBLAS workspaces, cached size embeddings), then is captured. Before a capture is used it is checked:
the same step is run eagerly from the same state, and the replay must give the same loss and the same update, else
that signature stays eager. A capture that fails (an operation that cannot be captured) also leaves it eager; the
reason is logged once. All captures share one memory pool: steps never run concurrently and keep nothing in it
between replays except the loss, which is copied out right away.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from traintrain.step import EagerSteps, OptimizerStep, StepInputs, StepState

log = logging.getLogger(__name__)

EAGER_STEPS_BEFORE_CAPTURE = 2
LOSS_TOLERANCE = 1e-2  # relative difference of the replayed loss from the eager one
UPDATE_AGREEMENT = 0.99  # cosine between the replayed and the eager parameter update


class Replay(Protocol):
    """A captured graph."""

    def replay(self) -> None:
        """Run the recorded work again, on the recorded addresses."""
        ...


class GraphBackend(Protocol):
    """How graphs are captured: CUDA here; tests stand in a CPU backend with the same contract."""

    def warmup(self) -> contextlib.AbstractContextManager:
        """Where eager steps before a capture run (a side stream on CUDA)."""
        ...

    def capture(self, body: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        """Record `body` without running it; its replay handle and its (static) output."""
        ...

    def synchronize(self) -> None:
        """Wait until the replayed work is done."""
        ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph captures in one shared private memory pool; eager warm-up on a side stream. Captures
    check only this thread: the WebUI's other threads may use the GPU meanwhile."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def warmup(self) -> contextlib.AbstractContextManager:
        """Run on the side stream, ordered after and before the current stream's work (as capture requires)."""
        return _SideStream(self.stream)

    def capture(self, body: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            output = body()
        return graph, output

    def synchronize(self) -> None:
        torch.cuda.synchronize()


class _SideStream(contextlib.AbstractContextManager):
    """Work inside runs on `stream`, ordered after the current stream's queued work and before its later work."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self._context = torch.cuda.stream(stream)

    def __enter__(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self.stream)


@dataclass
class _Signature:
    """One step signature: eager steps seen, and its graph once captured (or why it stays eager)."""

    eager_steps: int = 0
    graph: Replay | None = None
    inputs: StepInputs | None = None  # the graph's static input buffers
    loss: torch.Tensor | None = None  # the graph's static loss
    grads: list[torch.Tensor | None] | None = None  # forward-backward graphs: the gradient buffers it writes
    refused: str = ""


class CapturedSteps:
    """Runs steps as CUDA graph replays where a verified capture exists, eagerly otherwise.

    With `whole_step` the graph holds the optimizer step too (fused, capturable AdamW / Adam); otherwise it holds the
    forward and backward, which is where the thousands of small kernels are, and any optimizer steps eagerly on the
    gradients the replay wrote."""

    def __init__(
        self,
        step: OptimizerStep,
        backend: GraphBackend,
        *,
        whole_step: bool,
        warmup: int = EAGER_STEPS_BEFORE_CAPTURE,
    ) -> None:
        self.step, self.backend, self.whole_step, self.warmup = step, backend, whole_step, warmup
        self.eager = EagerSteps(step)
        self.signatures: dict[tuple, _Signature] = {}

    @property
    def captured(self) -> int:
        """How many signatures run as graphs."""
        return sum(entry.graph is not None for entry in self.signatures.values())

    @property
    def refusals(self) -> list[str]:
        """Why signatures stay eager (one line each)."""
        return [entry.refused for entry in self.signatures.values() if entry.refused]

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        entry = self.signatures.setdefault(inputs.signature(), _Signature())
        if entry.graph is not None:
            for name, tensor in inputs.tensors.items():
                entry.inputs.tensors[name].copy_(tensor)
            return self._replay(entry)
        if entry.refused:
            return self.eager(inputs)
        if entry.eager_steps < self.warmup:
            entry.eager_steps += 1
            with self.backend.warmup():
                return self.eager(inputs)
        return self._capture(entry, inputs)

    def _capture(self, entry: _Signature, inputs: StepInputs) -> torch.Tensor:
        """Capture this signature's step, check the replay against an eager step from the same state, and keep the
        graph only when they agree. Either way the step is done exactly once (state as after one step)."""
        before = _snapshot(self.step)
        eager_loss = self.eager(inputs)
        after = _snapshot(self.step) if before is not None else None
        if before is None or after is None:
            return self._refuse(entry, inputs, "not enough GPU memory to check a capture", eager_loss)
        before.restore()
        body = self.step if self.whole_step else self.step.forward_backward
        try:
            entry.inputs = StepInputs({name: t.clone() for name, t in inputs.tensors.items()}, inputs.variant)
            self.step.optimizer.zero_grad(set_to_none=True)
            entry.graph, entry.loss = self.backend.capture(lambda: body(entry.inputs))
            if not self.whole_step:
                entry.grads = [p.grad for p in self.step.parameters()]
            self._replay(entry)
            self.backend.synchronize()
            problem = _disagreement(eager_loss, entry.loss, before, after)
        except Exception as error:  # anything that cannot be captured: this signature stays eager
            problem = f"capture failed: {str(error).splitlines()[0][:200] if str(error) else type(error).__name__}"
        if problem:
            self.step.optimizer.zero_grad(set_to_none=True)
            after.restore()
            entry.graph = entry.inputs = entry.loss = entry.grads = None
            return self._refuse(entry, inputs, problem, eager_loss)
        kind = "forward, backward and optimizer step" if self.whole_step else "forward and backward"
        log.info("CUDA graph captured for %s (%s).", _describe(inputs), kind)
        return entry.loss.clone()

    @staticmethod
    def _refuse(entry: _Signature, inputs: StepInputs, problem: str, eager_loss: torch.Tensor) -> torch.Tensor:
        """This signature stays eager (said once in the log); the eager step's loss is the step's loss."""
        entry.refused = f"{_describe(inputs)}: {problem}"
        log.warning("CUDA graph not used for %s; these steps run eagerly.", entry.refused)
        return eager_loss

    def _replay(self, entry: _Signature) -> torch.Tensor:
        """Replay (a forward-backward graph: then the optimizer step on the gradients it wrote) and copy the loss
        out. Between steps the parameters' `.grad` are None, for the eager steps of other signatures."""
        optimizer = self.step.optimizer
        if entry.grads is not None:
            for param, grad in zip(self.step.parameters(), entry.grads):
                param.grad = grad
            optimizer.zero_grad(set_to_none=False)  # a replay writes them all; this keeps any stand-in honest too
        entry.graph.replay()
        if entry.grads is not None:
            self.step.apply()
        optimizer.zero_grad(set_to_none=True)
        return entry.loss.clone()


def _snapshot(step: OptimizerStep) -> StepState | None:
    """A copy of the step's state, None when the GPU has no room for it."""
    try:
        return step.snapshot()
    except torch.cuda.OutOfMemoryError:
        return None


def _disagreement(eager_loss: torch.Tensor, loss: torch.Tensor, before: StepState, after: StepState) -> str:
    """Empty when the replay did what the eager step did (same loss, same update of the state), else what differs."""
    expected, got = float(eager_loss), float(loss)
    if abs(got - expected) > LOSS_TOLERANCE * max(abs(expected), 1e-6):
        return f"replayed loss {got:.6g} differs from the eager step's {expected:.6g}"
    eager_update = torch.cat([(a - b).float().flatten() for a, b in zip(after.values, before.values)])
    graph_update = before.changed()
    if not bool(eager_update.any()):
        return "" if not bool(graph_update.any()) else "the replay changed weights the eager step left alone"
    agreement = float(F.cosine_similarity(eager_update, graph_update, dim=0))
    if agreement < UPDATE_AGREEMENT:
        return f"replayed update differs from the eager one (cosine {agreement:.4f})"
    return ""


def _describe(inputs: StepInputs) -> str:
    variant = "" if inputs.variant is None else f" ({inputs.variant})"
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in sorted(inputs.tensors.items()) if t.ndim >= 3)
    return f"step{variant} with {shapes or 'these shapes'}"
