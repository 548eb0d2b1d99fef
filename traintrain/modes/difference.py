"""Difference: a 1st pass learns a "copy machine" of the original image; a 2nd pass, with it applied, learns only
the difference to the target. The saved result is the 2nd-pass LoRA: a slider from original to target."""

from __future__ import annotations

from pathlib import Path

import torch

from traintrain.config import TrainConfig, sanitize_name
from traintrain.errors import TrainTrainError
from traintrain.files import is_file
from traintrain.models.bundle import Conditioning, ModelBundle
from traintrain.modes.common import (
    Objective,
    RunContext,
    TrainResult,
    build_network,
    load_network_file,
    prepared_model,
    seeded_generator,
    train_network,
)
from traintrain.modes.images import encode_image_pair
from traintrain.networks.network import Network
from traintrain.step import TrainingStep

def second_pass_config(config: TrainConfig) -> TrainConfig:
    """The 2nd pass's settings: the 2nd-pass panel when `use 2nd pass settings` (it already carries every setting the
    panel hides from pass 1), else the 1st pass's."""
    if config.use_2nd_pass_settings and config.second_pass is not None:
        return config.second_pass
    return config


LORA_SUFFIXES = (".safetensors", ".pt")  # what `diff load 1st pass` may name


def find_first_pass_file(ctx: RunContext, name: str) -> Path:
    """`diff load 1st pass`: a path, or a file name searched recursively in the Lora folder (.safetensors, then .pt,
    added when the name has neither)."""
    direct = Path(name)
    if direct.suffix in LORA_SUFFIXES and is_file(direct):
        return direct
    stem = sanitize_name(direct.stem if direct.suffix in LORA_SUFFIXES else name)
    for suffix in LORA_SUFFIXES:
        for path in sorted(Path(ctx.dirs.lora).rglob(f"{stem}{suffix}")):
            return path
    raise TrainTrainError(f"No copy machine {stem}.safetensors in {ctx.dirs.lora}: check 'diff load 1st pass'.")


def _reproduce(
    bundle: ModelBundle, objective: Objective, generator: torch.Generator, latents: torch.Tensor, cond: Conditioning
) -> TrainingStep:
    """A step that teaches the model to denoise `latents` (standard ε / v objective)."""
    return objective.denoising_step(bundle, lambda _index: (latents, cond, None, None), generator)


def train_difference(ctx: RunContext) -> TrainResult:
    """Pass 1 (copy machine, or loaded from a file), then pass 2 on the target with the copy machine applied."""
    config = ctx.config
    second = second_pass_config(config)
    name = config.effective_name
    with prepared_model(ctx, config) as bundle:
        original, target, _ = encode_image_pair(bundle, Path(config.original_image), Path(config.target_image))
        with torch.no_grad():
            cond = bundle.encode_text([config.original_prompt]).detach()
        first: TrainResult | None = None
        if config.diff_load_1st_pass:
            copier = load_network_file(ctx, config, find_first_pass_file(ctx, config.diff_load_1st_pass))
        else:
            generator = seeded_generator(config.resolved_seed(), bundle.device)
            copier = build_network(ctx, config, text_encoder=False)
            latents = original.repeat(config.train_batch_size, 1, 1, 1)
            step = _reproduce(bundle, Objective(bundle, config), generator, latents, cond.repeat(latents.shape[0]))
            save_copy = config.diff_save_1st_pass or config.diff_1st_pass_only
            first = train_network(
                ctx, config, copier, step, stem=f"{name}_copy", phase="1st pass", save_final=save_copy
            )
            if first.stopped or config.diff_1st_pass_only:
                return first
        result = _second_pass(ctx, second, copier, target, cond)
        if first is not None:
            result.extra_files = first.extra_files + result.extra_files
            if first.extra_files:
                result.message += "\nCopy machine (1st pass): " + ", ".join(str(p) for p in first.extra_files)
        return result


def _second_pass(
    ctx: RunContext, config: TrainConfig, copier: Network, target: torch.Tensor, cond: Conditioning
) -> TrainResult:
    """Train a new LoRA on the target with the frozen copy machine applied at full strength."""
    bundle = ctx.bundle
    for param in copier.parameters():
        param.requires_grad_(False)
    copier.set_multiplier(1.0)
    generator = seeded_generator(config.resolved_seed(), bundle.device)
    with copier.applied():
        network = build_network(ctx, config, text_encoder=False, resume=False)  # the slider starts from zero
        latents = target.repeat(config.train_batch_size, 1, 1, 1)
        step = _reproduce(bundle, Objective(bundle, config), generator, latents, cond.repeat(latents.shape[0]))
        return train_network(ctx, config, network, step, stem=config.effective_name, phase="2nd pass")
