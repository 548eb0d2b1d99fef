"""The full training state (LoRA weights unscaled, optimizer, scheduler, gradient scaler, weight EMA, step, seed) in
one safetensors file: tensors as tensors, everything else as JSON metadata; nothing is pickled."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from traintrain.ema import WeightAverage
from traintrain.errors import TrainTrainError
from traintrain.files import atomic_path

STATE_FORMAT = "traintrain-state-1"
_TENSOR, _FLOAT, _TUPLE = "__tensor__", "__float__", "__tuple__"


@dataclass
class TrainingState:
    """Everything a run needs to go on exactly where it stopped; `step` optimizer steps are done."""

    step: int
    seed: int
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    average: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_state(path: Path, state: TrainingState) -> Path:
    """Write `state` atomically to `path` (a `.safetensors` file)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {
        "step": state.step, "seed": state.seed, "network": state.network, "optimizer": state.optimizer,
        "scheduler": state.scheduler, "scaler": state.scaler, "average": state.average, "extra": state.extra,
    }  # fmt: skip
    encoded = _encode(tree, "", tensors)
    metadata = {"format": STATE_FORMAT, "state": json.dumps(encoded, allow_nan=False)}
    with atomic_path(Path(path)) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def read_state_metadata(path: Path) -> dict[str, Any]:
    """The plain values of a state file (step, seed, extra), without loading its tensors."""
    _, tree = _open(path, tensors=False)
    decoded = _decode(tree, None)
    return {key: decoded[key] for key in ("step", "seed", "extra")}


def load_state(path: Path) -> TrainingState:
    """Read a state file written by `save_state`."""
    tensors, tree = _open(path, tensors=True)
    decoded = _decode(tree, tensors)
    return TrainingState(**decoded)


def _open(path: Path, *, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise TrainTrainError(f"Training state {path} is not a .safetensors file: give the path of a saved state.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            loaded = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise TrainTrainError(f"{path.name} is not a readable safetensors file: {error}.") from error
    if metadata.get("format") != STATE_FORMAT:
        raise TrainTrainError(f"{path.name} is not a TrainTrain training state (a LoRA goes in 'network resume').")
    return loaded, json.loads(metadata["state"])


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `value`: tensors are stored under their path, non-finite floats and tuples are tagged."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TrainTrainError(f"The training state at {key or 'the top'} has keys that cannot be saved.")
        return {"__keys__": [[type(k).__name__, k] for k in value],
                "__values__": [_encode(v, f"{key}.{k}", tensors) for k, v in value.items()]}  # fmt: skip
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TrainTrainError(
        f"The training state holds a {type(value).__name__} at {key}, which cannot be saved: turn off "
        "'save training state' for this optimizer / scheduler."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    """The inverse of `_encode`; with `tensors` None, tensors come back as None."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return None if tensors is None else tensors[value[_TENSOR]]
    if _FLOAT in value:
        return float(value[_FLOAT])
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    keys = [int(k) if kind == "int" else k for kind, k in value["__keys__"]]
    return {k: _decode(v, tensors) for k, v in zip(keys, value["__values__"])}


def capture_state(
    step: int,
    seed: int,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    average: WeightAverage | None,
) -> TrainingState:
    """The state after `step` optimizer steps (tensors are the live ones: save it before training goes on)."""
    return TrainingState(
        step=step,
        seed=seed,
        network=network.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=None if scheduler is None else scheduler.state_dict(),
        scaler=None if scaler is None else scaler.state_dict(),
        average=None if average is None else {"updates": average.updates, "weights": list(average.average)},
    )


def restore_state(
    state: TrainingState,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    average: WeightAverage | None,
) -> int:
    """Put `state` into a freshly built run with the same settings; the number of steps already done."""
    hint = "the training state does not fit these settings ({}): resume with the settings it was saved with."
    try:
        network.load_state_dict(state.network)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError) as error:
        raise TrainTrainError(hint.format(str(error).splitlines()[0])) from error
    device = next(network.parameters()).device
    for group in optimizer.param_groups:  # learning rates held as tensors (CUDA graphs) stay on the device
        group.update({k: v.to(device) for k, v in group.items() if k != "params" and isinstance(v, torch.Tensor)})
    if (scheduler is None) != (state.scheduler is None) or (average is None) != (state.average is None):
        raise TrainTrainError(hint.format("learning-rate scheduler or EMA differ"))
    if scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    if average is not None:
        with torch.no_grad():
            for mine, saved in zip(average.average, state.average["weights"]):
                mine.copy_(saved)
        average.updates = int(state.average["updates"])
    return state.step
