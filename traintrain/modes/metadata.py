"""The training facts a saved LoRA carries as kohya `ss_*` metadata (the `ss_` prefix is added when saving):
settings, base model, dataset, epochs and optimizer, in the value formats kohya sd-scripts writes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from traintrain.config import TrainConfig
from traintrain.networks.hashes import legacy_file_hash

_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # the WebUI's checkpoint title ends with " [shorthash]"
_SIZED_MODES = ("LoRA", "iLECO", "Multi-ADDifT")  # the modes that train at 'image size'
_FOLDER_MODES = ("LoRA", "Multi-ADDifT")  # the modes that read 'lora data directory'


def kohya_settings(config: TrainConfig, *, images: int, steps: int) -> dict[str, object]:
    """Every `ss_*` value of a pass (without the prefix): `images` is the number of training images (pairs), `steps`
    the steps done so far."""
    c = config
    repeats = c.image_num_multiply if c.mode in _FOLDER_MODES else 1
    steps_per_epoch = max(1, math.ceil(images * repeats / c.train_batch_size))
    values: dict[str, object] = {
        "learning_rate": c.train_learning_rate,
        "text_encoder_lr": c.train_textencoder_learning_rate or c.train_learning_rate,
        "unet_lr": c.train_learning_rate,
        "max_train_steps": c.train_iterations,
        "lr_warmup_steps": c.train_lr_warmup_steps,
        "lr_scheduler": c.train_lr_scheduler,
        "lr_step_rules": c.train_lr_step_rules,
        "lr_scheduler_num_cycles": c.train_lr_scheduler_num_cycles,
        "lr_scheduler_power": c.train_lr_scheduler_power,
        "optimizer": optimizer_text(c),
        "seed": c.resolved_seed(),
        "min_snr_gamma": c.train_snr_gamma,
        "mixed_precision": c.train_model_precision,
        "mode": c.mode,
        "network_type": c.network_type,
        "network_element": c.network_element,
        "network_blocks": ",".join(c.network_blocks),
        "network_strength": c.network_strength,
        "clip_skip": getattr(c, "clip_skip", 1),
        "num_train_images": images * repeats,
        "num_reg_images": 0,
        "dataset_dirs": json.dumps(_dataset_dirs(c, images, repeats)),
        "epoch": math.ceil(steps / steps_per_epoch),
        "num_epochs": math.ceil(c.train_iterations / steps_per_epoch),
        "batch_size_per_device": c.train_batch_size,
        "gradient_accumulation_steps": 1,
        "noise_offset": getattr(c, "noise_offset", None),
        "caption_dropout_rate": getattr(c, "caption_dropout_rate", 0.0),
        "gradient_checkpointing": c.use_gradient_checkpointing,
    }
    if c.mode in _SIZED_MODES:
        values["resolution"] = str(tuple(c.image_size))
    values.update(_base_model(c.model))
    return values


def optimizer_text(config: TrainConfig) -> str:
    """kohya's `ss_optimizer`: the optimizer, with its settings in parentheses when there are any."""
    args = ",".join(f"{key}={value}" for key, value in config.train_optimizer_settings.items())
    return config.train_optimizer + (f"({args})" if args else "")


def _dataset_dirs(config: TrainConfig, images: int, repeats: int) -> dict[str, dict[str, int]]:
    if config.mode not in _FOLDER_MODES or not config.lora_data_directory.strip():
        return {}
    return {Path(config.lora_data_directory).name: {"n_repeats": repeats, "img_count": images}}


def _base_model(model: str) -> dict[str, str]:
    """`sd_model_name` (file name, without the WebUI's hash suffix) and, for a model file, its `sd_model_hash`."""
    if not model.strip():
        return {}
    name = _TITLE_HASH.sub("", model.strip())
    facts = {"sd_model_name": Path(name).name}
    if Path(model).is_file():
        facts["sd_model_hash"] = legacy_file_hash(Path(model))
    return facts
