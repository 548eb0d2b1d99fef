"""ADDifT and Multi-ADDifT: learn the difference between an original and a target image directly, in tens of steps.

At strength +0.25 the LoRA must make the prediction on the noised target equal the frozen model's prediction on the
identically noised original; odd steps train the mirrored relation at -0.25·|diff alt ratio|. In x0 terms a positive
LoRA then moves the denoised estimate by (target - original): toward the target (`diff revert original target` swaps).
"""

from __future__ import annotations

from pathlib import Path

import torch

from traintrain.data import PairedLatentDataset, load_pair_dataset
from traintrain.models.bundle import Conditioning, ModelBundle
from traintrain.modes.common import (
    Objective,
    RunContext,
    TrainResult,
    build_network,
    prepared_model,
    seeded_generator,
    train_network,
)
from traintrain.modes.images import encode_image_pair
from traintrain.modes.lora import PromptCache, data_options
from traintrain.networks.network import Network
from traintrain.step import StepInputs, TrainingStep, tensors_without_none

TRAIN_STRENGTH = 0.25


def ladder_timestep(step: int, low: int, high: int) -> int:
    """The deterministic ADDifT timestep: 10 rungs over [low, high), each used for an even step and the next odd one."""
    rung = step - step % 2
    span = (high - low) / 10
    return min(int(low + span * (rung % 10 + 1)), 999)


class DifferenceObjective:
    """The ADDifT step for batches of (original, target) latents and their conditionings."""

    def __init__(self, bundle: ModelBundle, network: Network, objective: Objective, alt_ratio: float) -> None:
        self.bundle, self.network, self.objective, self.alt_ratio = bundle, network, objective, alt_ratio

    def inputs(
        self,
        step: int,
        original: torch.Tensor,
        target: torch.Tensor,
        conds: tuple[Conditioning, Conditioning],
        generator: torch.Generator,
        mask: torch.Tensor | None = None,
    ) -> StepInputs:
        """The step's tensors: both sides, the shared noise, the ladder timestep; the variant is the step's parity."""
        c = self.objective.config
        t = ladder_timestep(step, c.train_min_timesteps, c.train_max_timesteps)
        timesteps = torch.full((original.shape[0],), t, device=original.device, dtype=torch.long)
        noise = torch.randn(original.shape, generator=generator, device=original.device)
        mask = mask if c.diff_use_diff_mask else None
        tensors = tensors_without_none(original=original, target=target, noise=noise, timesteps=timesteps, mask=mask)
        return StepInputs({**tensors, **conds[0].tensors("original"), **conds[1].tensors("target")}, variant=step % 2)

    def loss(self, inputs: StepInputs) -> torch.Tensor:
        """Even steps: target side at +0.25 vs frozen original side; odd steps mirrored at -0.25·|alt ratio|."""
        original, target, noise, timesteps = inputs["original"], inputs["target"], inputs["noise"], inputs["timesteps"]
        odd = inputs.variant == 1
        if odd and self.alt_ratio < 0:
            original, target = noise, noise
        reference_side, trained_side = (target, original) if odd else (original, target)
        schedule = self.objective.schedule
        original_cond = Conditioning.from_tensors(inputs.tensors, "original")
        target_cond = Conditioning.from_tensors(inputs.tensors, "target")
        with torch.no_grad(), self.network.multiplier(0.0):
            noisy_reference = schedule.add_noise(reference_side, noise, timesteps)
            reference = self.bundle.predict(noisy_reference, timesteps, original_cond)
        strength = -TRAIN_STRENGTH * abs(self.alt_ratio) if odd else TRAIN_STRENGTH
        with self.network.multiplier(strength):
            prediction = self.bundle.predict(schedule.add_noise(trained_side, noise, timesteps), timesteps, target_cond)
        return self.objective.loss(prediction, reference, timesteps, inputs.get("mask"))


def train_addift(ctx: RunContext) -> TrainResult:
    """Train and save an ADDifT LoRA from one original / target image pair."""
    config = ctx.config
    with prepared_model(ctx, config) as bundle:
        generator = seeded_generator(config.resolved_seed(), bundle.device)
        original, target, mask = encode_image_pair(bundle, Path(config.original_image), Path(config.target_image))
        if config.diff_revert_original_target:
            original, target = target, original
        batch = config.train_batch_size
        original, target = original.repeat(batch, 1, 1, 1), target.repeat(batch, 1, 1, 1)
        with torch.no_grad():
            conds = bundle.encode_text([config.original_prompt, config.target_prompt]).detach()
        pair = (conds.select(slice(0, 1)).repeat(batch), conds.select(slice(1, 2)).repeat(batch))
        network = build_network(ctx, config, text_encoder=False)
        difference = DifferenceObjective(bundle, network, Objective(bundle, config), config.diff_alt_ratio)

        def inputs(index: int) -> StepInputs:
            return difference.inputs(index, original, target, pair, generator, mask)

        step = TrainingStep(inputs, difference.loss)
        return train_network(ctx, config, network, step, stem=config.effective_name)


def train_multi_addift(ctx: RunContext) -> TrainResult:
    """Train and save a Multi-ADDifT LoRA from a folder of pairs matched by the `diff target name` suffix."""
    config = ctx.config
    pairs = load_pair_dataset(Path(config.lora_data_directory), config.diff_target_name, data_options(config))
    with prepared_model(ctx, config) as bundle:
        generator = seeded_generator(config.resolved_seed(), bundle.device)
        sampler = torch.Generator().manual_seed(config.resolved_seed())  # batches are drawn on the CPU
        with torch.no_grad():
            dataset = PairedLatentDataset.build(pairs, bundle.encode_images)
        del pairs
        network = build_network(ctx, config, text_encoder=False)
        prompts = PromptCache(bundle, dataset.prompts, live=False)
        difference = DifferenceObjective(bundle, network, Objective(bundle, config), config.diff_alt_ratio)

        def inputs(index: int) -> StepInputs:
            batch = dataset.sample_batch(config.train_batch_size, sampler)
            original, target = batch.original_latents.to(bundle.device), batch.target_latents.to(bundle.device)
            conds = (prompts(batch.original_prompts), prompts(batch.target_prompts))
            if config.diff_revert_original_target:
                original, target, conds = target, original, conds[::-1]
            mask = None if batch.masks is None else batch.masks.to(bundle.device)
            return difference.inputs(index, original, target, conds, generator, mask)

        step = TrainingStep(inputs, difference.loss)
        pairs = len(dataset.prompts) // 2  # an original and a target prompt per pair
        return train_network(ctx, config, network, step, stem=config.effective_name, images=pairs)
