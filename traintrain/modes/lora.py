"""LoRA mode: learn a LoRA from a folder of images and captions (buckets, sub-images, mirroring, trigger word)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from traintrain import distributed
from traintrain.config import TrainConfig
from traintrain.devices import host_tensor_on
from traintrain.data import DataOptions, ImageDataset, LatentDataset, load_image_dataset, tag_frequency
from traintrain.data.latent_cache import CachedEncoder
from traintrain.data.regularisation import RegularisedBatches
from traintrain.data.caption_variation import CaptionOptions, CaptionVariation
from traintrain.models.bundle import Conditioning, ModelBundle
from traintrain.modes.common import (
    Objective,
    RunContext,
    TrainResult,
    build_network,
    image_encoder,
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


def caption_options(config: TrainConfig) -> CaptionOptions:
    """The per-step caption variation of a config."""
    return CaptionOptions(
        shuffle=config.caption_shuffle_tags,
        keep_tokens=config.caption_keep_tokens,
        dropout_rate=config.caption_dropout_rate,
        tag_dropout_rate=config.caption_tag_dropout_rate,
    )


class PromptCache:
    """Conditioning per prompt, encoded once when the text encoder is frozen, or live when it is trained; `varied`
    prompts (new every step) are encoded at each step, without gradients, instead of cached."""

    def __init__(self, bundle: ModelBundle, prompts: list[str], live: bool, *, varied: bool = False) -> None:
        self.bundle, self.live, self.varied = bundle, live, varied
        self._cache: dict[str, Conditioning] = {}
        if not live and not varied:
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
        if self.varied:
            with torch.no_grad():
                return self.bundle.encode_text(prompts).detach()
        return Conditioning.cat([self._cache[p] for p in prompts])


def regularisation_images(config: TrainConfig) -> ImageDataset | None:
    """The regularisation images (own captions, no trigger word, their own repeats), None when no folder is set."""
    if not config.reg_data_directory.strip():
        return None
    options = dataclasses.replace(data_options(config), trigger_word="", num_multiply=config.reg_num_multiply)
    return load_image_dataset(Path(config.reg_data_directory), options)


def train_lora(ctx: RunContext) -> TrainResult:
    """Train and save a LoRA from `lora_data_directory` (with prior preservation on `reg_data_directory`)."""
    config = ctx.config
    images = load_image_dataset(Path(config.lora_data_directory), data_options(config))
    reg_images = regularisation_images(config)
    with prepared_model(ctx, config) as bundle:
        generator = seeded_generator(config.resolved_seed(), bundle.device)
        sampler = torch.Generator().manual_seed(config.resolved_seed())  # batches are drawn on the CPU
        encode = image_encoder(ctx, config)
        with torch.no_grad():
            shared = distributed.encoded_by_main(encode)  # data-parallel: rank 0 encodes, the others receive
            dataset = LatentDataset.build(images, shared)
            regularisation = None if reg_images is None else LatentDataset.build(reg_images, shared)
        del images, reg_images
        if isinstance(encode, CachedEncoder):
            log.info("Latents: %s", encode.summary())
        if config.logging_verbose:
            log.info("Dataset: %s", dataset.summary())
        batches = RegularisedBatches(dataset, regularisation)
        network = build_network(ctx, config, text_encoder=TEXT_BLOCK in config.network_blocks)
        captions = CaptionVariation(caption_options(config), config.resolved_seed())
        live = bool(network.text_encoder_names)
        all_prompts = dataset.prompts + (regularisation.prompts if regularisation else [])
        prompts = PromptCache(bundle, all_prompts, live=live, varied=captions.options.varies)
        objective = Objective(bundle, config)
        weights = {flag: torch.tensor(w, device=bundle.device) for flag, w in ((False, 1.0), (True, config.reg_loss_weight))}

        def draw(_index: int) -> tuple:
            batch, regular = batches.sample_batch(config.train_batch_size, sampler)
            mask = None if batch.masks is None else batch.masks.to(bundle.device)
            sizes = host_tensor_on(bundle.device, batch.sizes)  # SDXL's size conditioning of each image
            weight = weights[regular] if regularisation is not None else None
            return batch.latents.to(bundle.device), prompts(captions(batch.prompts)), mask, sizes, weight

        step = objective.denoising_step(bundle, draw, generator)
        tags = tag_frequency(dataset.prompts)
        return train_network(
            ctx, config, network, step, stem=config.effective_name, tags=tags, images=len(dataset.prompts)
        )
