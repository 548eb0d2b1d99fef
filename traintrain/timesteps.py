"""How training timesteps are drawn: uniformly (the original), logit-normal, or shifted toward noisier steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from traintrain.diffusion import NoiseSchedule
from traintrain.errors import TrainTrainError


@dataclass(frozen=True)
class TimestepSampling:
    """The distribution of timesteps over [min, max): `kind` is uniform, logit_normal or shifted."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0


def fractions(count: int, generator: torch.Generator, sampling: TimestepSampling) -> torch.Tensor:
    """`count` positions in [0, 1) of the timestep range, distributed as `sampling` says."""
    device = generator.device
    if sampling.kind == "logit_normal":
        normal = torch.randn((count,), generator=generator, device=device)
        return torch.sigmoid(sampling.logit_mean + sampling.logit_std * normal)
    uniform = torch.rand((count,), generator=generator, device=device)
    if sampling.kind == "shifted":  # the SD3 / flow-matching time shift: s·u / (1 + (s-1)·u)
        return sampling.shift * uniform / (1.0 + (sampling.shift - 1.0) * uniform)
    raise TrainTrainError(f"Unknown timestep sampling {sampling.kind!r}: choose uniform, logit_normal or shifted.")


def draw_timesteps(
    schedule: NoiseSchedule,
    batch: int,
    low: int,
    high: int,
    generator: torch.Generator,
    sampling: TimestepSampling = TimestepSampling(),
    *,
    shared: bool = False,
) -> torch.Tensor:
    """Integer timesteps in [low, high) for a batch (one for all when `shared`); uniform draws as the original did."""
    if sampling.kind == "uniform":
        return schedule.sample_timesteps(batch, low, high, generator, shared=shared)
    high = min(high, schedule.num_timesteps)
    if not 0 <= low < high:
        raise TrainTrainError(f"Timestep range [{low}, {high}) is empty: set min timesteps below max timesteps.")
    position = fractions(1 if shared else batch, generator, sampling)
    t = (low + (position * (high - low)).long()).clamp(low, high - 1)
    return t.expand(batch).clone() if shared else t
