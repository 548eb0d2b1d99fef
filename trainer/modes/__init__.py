"""Training modes: each turns a validated TrainConfig and a ModelBundle into saved files through the loop."""

from __future__ import annotations

import json
from typing import Callable

from trainer.files import atomic_write_text, inside, output_path
from trainer.modes.common import OutputDirs, RunContext, TrainResult

__all__ = ["OutputDirs", "RunContext", "TrainResult", "run_training"]


def run_training(ctx: RunContext) -> TrainResult:
    """Validate, refuse an existing output up front, record the settings, and run the config's mode."""
    config = ctx.config
    config.validate()
    output_path(ctx.dirs.lora, config.effective_name, ".safetensors", config.save_overwrite)
    if config.save_as_json:
        day = ctx.stamp.split("_")[0]
        path = inside(ctx.dirs.jsons, f"{day}/{config.effective_name}-{ctx.stamp}.json")
        atomic_write_text(path, json.dumps(config.to_json_dict(), indent=2))
    ctx.stop.clear()
    return _mode_runner(config.mode)(ctx)


def _mode_runner(mode: str) -> Callable[[RunContext], TrainResult]:
    from trainer.modes.addift import train_addift, train_multi_addift
    from trainer.modes.difference import train_difference
    from trainer.modes.ileco import train_ileco
    from trainer.modes.lora import train_lora

    runners = {
        "LoRA": train_lora,
        "iLECO": train_ileco,
        "Difference": train_difference,
        "ADDifT": train_addift,
        "Multi-ADDifT": train_multi_addift,
    }
    return runners[mode]
