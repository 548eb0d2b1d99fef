"""Values the original TrainTrain accepted that this project's validation refuses, corrected where their meaning is
clear (each correction comes with a note for the UI / CLI to show); anything else is left for validation to refuse.

Applied wherever settings are read (settings JSON, the UI's widgets, the CLI), before `TrainConfig.validate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from traintrain.config import FIELD_BY_NAME, TrainConfig

GRID = 8  # pixel sizes are multiples of 8 (the latent grid); the original's buckets floor sizes to their step
MIN_SIDE = 64
MAX_TIMESTEPS = 1000
DEFAULT_BUCKET_STEP = FIELD_BY_NAME["image_buckets_step"].default


def normalised(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """`config` with the original's accepted values corrected, and one note per correction (2nd pass included)."""
    second, second_notes = normalised(config.second_pass) if config.second_pass is not None else (None, [])
    changes, notes = _corrections(config)
    if not changes and second is config.second_pass:
        return config, notes
    fixed = dataclasses.replace(config, **changes, second_pass=second)
    fixed.unknown_keys = config.unknown_keys
    return fixed, notes + [f"2nd pass: {note}" for note in second_notes if note not in notes]


def _corrections(c: TrainConfig) -> tuple[dict[str, Any], list[str]]:
    changes: dict[str, Any] = {}
    notes: list[str] = []

    def correct(name: str, value: Any, why: str) -> None:
        changes[name] = value
        notes.append(f"'{FIELD_BY_NAME[name].label}' {_text(getattr(c, name))} → {_text(value)}: {why}")

    size = tuple(_floored(side) for side in c.image_size) if _sides_ok(c.image_size) else c.image_size
    if size != c.image_size:
        correct("image_size", size, "sides are rounded down to a multiple of 8, as the original's buckets round them.")
    step = c.image_buckets_step
    if step == 0:
        correct("image_buckets_step", DEFAULT_BUCKET_STEP, "0 is no step (the original's bucket search never ended).")
    elif step > GRID and step % GRID:
        correct("image_buckets_step", _floored(step), "bucket steps are rounded down to a multiple of 8.")
    if c.image_min_length > MIN_SIDE and c.image_min_length % GRID:
        correct("image_min_length", _floored(c.image_min_length), "rounded down to a multiple of 8.")
    if 0 < c.image_max_ratio < 1:
        correct("image_max_ratio", 1 / c.image_max_ratio, "the limit applies both ways (w/h and h/w), so "
                f"{c.image_max_ratio:g} means {1 / c.image_max_ratio:g}.")  # fmt: skip
    if MAX_TIMESTEPS < c.train_max_timesteps and c.train_min_timesteps < MAX_TIMESTEPS:
        correct("train_max_timesteps", MAX_TIMESTEPS, "the model has 1000 timesteps (0 … 999).")
    return changes, notes


def _sides_ok(size: Any) -> bool:
    """Whether `size` is two whole numbers that round to sides of at least 64 (others are for validation)."""
    return isinstance(size, tuple) and all(isinstance(s, int) and s >= MIN_SIDE for s in size)


def _floored(value: int) -> int:
    return value // GRID * GRID


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value[0] != value[1] else str(value[0])
    return f"{value:g}" if isinstance(value, float) else str(value)


def with_notes(message: str, notes: list[str]) -> str:
    """`message` followed by the correction notes, one per line."""
    return "\n".join([message, *(f"Note: {note}" for note in notes)])
