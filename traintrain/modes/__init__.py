"""Training modes: each turns a validated TrainConfig and a ModelBundle into saved files through the loop."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Callable

from traintrain import distributed
from traintrain.config import TrainConfig
from traintrain.files import atomic_write_text, inside, output_path
from traintrain.modes.common import OutputDirs, RunContext, TrainResult
from traintrain.optim import check_optimizer, check_scheduler

__all__ = ["OutputDirs", "RunContext", "TrainResult", "advice", "run_training"]

log = logging.getLogger(__name__)


def run_training(ctx: RunContext) -> TrainResult:
    """Validate, refuse an existing output up front, record the settings, and run the config's mode."""
    config = ctx.config
    config.validate()
    for settings in (config, config.second_pass):
        if settings is not None:
            check_optimizer(settings.train_optimizer, settings.train_optimizer_settings)
            check_scheduler(settings.train_lr_scheduler, settings.train_lr_scheduler_settings, settings.train_lr_step_rules)
    first_pass_only = config.mode == "Difference" and config.diff_1st_pass_only
    final_stem = config.effective_name + ("_copy" if first_pass_only else "")
    output_path(ctx.dirs.lora, final_stem, ".safetensors", config.save_overwrite)
    if config.save_as_json and distributed.is_main():
        day = ctx.stamp.split("_")[0]
        path = inside(ctx.dirs.jsons, f"{day}/{config.effective_name}-{ctx.stamp}.json")
        atomic_write_text(path, json.dumps(config.to_json_dict(), indent=2))
    notes = advice(config)
    for note in notes:
        log.warning(note)
    result = _mode_runner(config.mode)(replace(ctx, config=distributed.with_global_batch(config)))
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
