"""iLECO: from two prompts, learn a LoRA that makes the model, given Original, predict what it predicts for Target."""

from __future__ import annotations

import torch

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
from traintrain.networks.network import Network
from traintrain.step import StepInputs, TrainingStep


def train_ileco(ctx: RunContext) -> TrainResult:
    """Train and save an iLECO LoRA (UNet only: the prompts are encoded once by the frozen text encoder).

    Each step draws fresh Gaussian latents and timesteps over the chosen range; the target is the frozen model's
    prediction for the Target prompt (an empty Target is the unconditional prediction, which erases the concept).
    """
    config = ctx.config
    height, width = config.image_size
    with prepared_model(ctx, config) as bundle:
        generator = seeded_generator(config.resolved_seed(), bundle.device)
        shape = (config.train_batch_size, 4, height // 8, width // 8)
        with torch.no_grad():
            conds = bundle.encode_text([config.original_prompt, config.target_prompt]).detach()
        original = conds.select(slice(0, 1)).repeat(shape[0])
        target = conds.select(slice(1, 2)).repeat(shape[0])
        network = build_network(ctx, config, text_encoder=False)
        objective = Objective(bundle, config)

        def inputs(_index: int) -> StepInputs:
            latents = torch.randn(shape, generator=generator, device=bundle.device)
            return StepInputs({"latents": latents, "timesteps": objective.timesteps(shape[0], generator)})

        def loss(inputs: StepInputs) -> torch.Tensor:
            return ileco_loss(bundle, network, objective, inputs, original, target)

        return train_network(ctx, config, network, TrainingStep(inputs, loss), stem=config.effective_name, images=0)


def ileco_loss(
    bundle: ModelBundle,
    network: Network,
    objective: Objective,
    inputs: StepInputs,
    original: Conditioning,
    target: Conditioning,
) -> torch.Tensor:
    """The LoRA's prediction for the Original prompt against the frozen model's prediction for the Target prompt."""
    latents, timesteps = inputs["latents"], inputs["timesteps"]
    with torch.no_grad(), network.multiplier(0.0):
        reference = bundle.predict(latents, timesteps, target)
    prediction = bundle.predict(latents, timesteps, original)
    return objective.loss(prediction, reference, timesteps)
