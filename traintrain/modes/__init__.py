"""Training modes: each turns a validated TrainConfig and a ModelBundle into saved files through the loop."""

from __future__ import annotations

import json
import logging
from typing import Callable

from traintrain.config import TrainConfig
from traintrain.files import atomic_write_text, check_writable, inside, output_path, remove_stale_temp_files
from traintrain.modes.common import OutputDirs, RunContext, TrainResult
from traintrain.preflight import check_before_model

__all__ = ["OutputDirs", "RunContext", "TrainResult", "advice", "run_training"]

log = logging.getLogger(__name__)


def run_training(ctx: RunContext) -> TrainResult:
    """Validate, refuse an existing output up front, record the settings, and run the config's mode."""
    config = ctx.config
    check_before_model(config)
    first_pass_only = config.mode == "Difference" and config.diff_1st_pass_only
    final_stem = config.effective_name + ("_copy" if first_pass_only else "")
    remove_stale_temp_files(ctx.dirs.lora)
    check_writable(ctx.dirs.lora)  # a read-only Lora folder is refused before training, not after
    output_path(ctx.dirs.lora, final_stem, ".safetensors", config.save_overwrite)
    if config.save_as_json:
        day = ctx.stamp.split("_")[0]
        path = inside(ctx.dirs.jsons, f"{day}/{config.effective_name}-{ctx.stamp}.json")
        atomic_write_text(path, json.dumps(config.to_json_dict(), indent=2))
    notes = advice(config)
    for note in notes:
        log.warning(note)
    result = _mode_runner(config.mode)(ctx)
    result.message = "\n".join([*notes, result.message])
    return result


def advice(config: TrainConfig) -> list[str]:
    """Warnings about settings that run but are known to work badly."""
    notes = []
    if config.mode == "Difference" and "8bit" in config.train_optimizer.lower():
        notes.append(
            f"Note: {config.train_optimizer} does not work well in Difference mode (the copy machine barely learns): "
            "AdamW is recommended."
        )
    return notes


def _mode_runner(mode: str) -> Callable[[RunContext], TrainResult]:
    from traintrain.modes.addift import train_addift, train_multi_addift
    from traintrain.modes.difference import train_difference
    from traintrain.modes.ileco import train_ileco
    from traintrain.modes.lora import train_lora

    runners = {
        "LoRA": train_lora,
        "iLECO": train_ileco,
        "Difference": train_difference,
        "ADDifT": train_addift,
        "Multi-ADDifT": train_multi_addift,
    }
    return runners[mode]
