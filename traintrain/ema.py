"""An exponential moving average of the trained weights, which is what gets saved when it is on."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

WARMUP_STEPS = 10  # the decay starts at 1/10 and grows as (1 + n) / (10 + n) until it reaches the set decay


class WeightAverage:
    """EMA of parameters: after update n (0-based), avg ← d·avg + (1 - d)·param with d = min(decay, (1+n)/(10+n)),
    so a short run is not held at the initial weights."""

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.average = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (WARMUP_STEPS + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average toward the current weights (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        for average, parameter in zip(self.average, self.parameters):
            average.lerp_(parameter.detach().to(average.dtype), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Put the average into the parameters (for the final save)."""
        for average, parameter in zip(self.average, self.parameters):
            parameter.copy_(average)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the average inside the block (a periodic save) and their own values after it."""
        kept = [p.detach().clone() for p in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, kept):
                    parameter.copy_(value)
