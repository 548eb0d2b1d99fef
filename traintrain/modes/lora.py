"""LoRA mode: learn a LoRA from a folder of images and captions (buckets, sub-images, mirroring, trigger word)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from traintrain.config import TrainConfig
from traintrain.devices import host_tensor_on
from traintrain.data import DataOptions, LatentDataset, load_image_dataset, tag_frequency
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
from traintrain.models.targets import TEXT_BLOCK

log = logging.getLogger(__name__)


def data_options(config: TrainConfig) -> DataOptions:
    """The dataset options of a config."""
    return DataOptions(
        image_size=config.image_size,
        buckets_step=config.image_buckets_step,
        min_length=config.image_min_length,
        max_ratio=config.image_max_ratio,
        sub_image_num=config.sub_image_num,
        mirroring=config.image_mirroring,
        num_multiply=config.image_num_multiply,
        use_filename_as_tag=config.image_use_filename_as_tag,
        disable_upscale=config.image_disable_upscale,
        trigger_word=config.lora_trigger_word,
    )


class PromptCache:
    """Conditioning per prompt, encoded once when the text encoder is frozen, or live when it is trained."""

    def __init__(self, bundle: ModelBundle, prompts: list[str], live: bool) -> None:
        self.bundle, self.live = bundle, live
        self._cache: dict[str, Conditioning] = {}
        if not live:
            unique = sorted(set(prompts))
            tokens = bundle.tokenize(unique)  # one tokenization: every prompt gets the same number of 75-token chunks
            with torch.no_grad():
                for start in range(0, len(unique), 16):
                    part = {name: tensor[start : start + 16] for name, tensor in tokens.items()}
                    cond = bundle.encode_tokens(part).detach()
                    for i, prompt in enumerate(unique[start : start + 16]):
                        self._cache[prompt] = cond.select(slice(i, i + 1))

    def __call__(self, prompts: list[str]) -> Conditioning | dict[str, torch.Tensor]:
        """Conditioning for a batch of prompts; when live, their token tensors (encoded inside the step's loss, where
        gradients reach the text encoder's LoRA)."""
        if self.live:
            return self.bundle.tokenize(prompts)
        return Conditioning.cat([self._cache[p] for p in prompts])


def train_lora(ctx: RunContext) -> TrainResult:
    """Train and save a LoRA from `lora_data_directory`."""
    config = ctx.config
    images = load_image_dataset(Path(config.lora_data_directory), data_options(config))
    with prepared_model(ctx, config) as bundle:
        generator = seeded_generator(config.resolved_seed(), bundle.device)
        sampler = torch.Generator().manual_seed(config.resolved_seed())  # batches are drawn on the CPU
        with torch.no_grad():
            dataset = LatentDataset.build(images, bundle.encode_images)
        del images
        if config.logging_verbose:
            log.info("Dataset: %s", dataset.summary())
        network = build_network(ctx, config, text_encoder=TEXT_BLOCK in config.network_blocks)
        prompts = PromptCache(bundle, dataset.prompts, live=bool(network.text_encoder_names))
        objective = Objective(bundle, config)

        def draw(_index: int) -> tuple[torch.Tensor, Conditioning | dict, torch.Tensor | None, torch.Tensor]:
            batch = dataset.sample_batch(config.train_batch_size, sampler)
            mask = None if batch.masks is None else batch.masks.to(bundle.device)
            sizes = host_tensor_on(bundle.device, batch.sizes)  # SDXL's size conditioning of each image
            return batch.latents.to(bundle.device), prompts(batch.prompts), mask, sizes

        step = objective.denoising_step(bundle, draw, generator)
        tags = tag_frequency(dataset.prompts)
        return train_network(
            ctx, config, network, step, stem=config.effective_name, tags=tags, images=len(dataset.prompts)
        )
