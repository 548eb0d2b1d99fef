"""Regularisation images: their batches come in proportion to their repeats, their loss is weighted, and a LoRA
training really draws them (captions without the trigger word)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from traintrain.config import TrainConfig
from traintrain.data import DataOptions, LatentDataset, load_image_dataset
from traintrain.data.regularisation import RegularisedBatches
from traintrain.demo import demo_config, write_sample_images
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.modes.common import Objective

OPTIONS = DataOptions(image_size=(64, 64), buckets_step=64, min_length=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    train, reg = write_sample_images(root / "train"), write_sample_images(root / "reg", seed=1)
    for caption in reg.glob("*.txt"):
        caption.write_text("a photo of a shape", encoding="utf-8")
    return train, reg


def latents(folder: Path, repeats: int = 1) -> LatentDataset:
    images = load_image_dataset(folder, dataclasses.replace(OPTIONS, num_multiply=repeats))
    return LatentDataset.build(images, lambda pixels: F.avg_pool2d(pixels, 8))


def test_regularisation_batches_come_in_proportion_to_their_repeats(folders):
    train, reg = folders
    mixed = RegularisedBatches(latents(train), latents(reg, repeats=3))
    assert mixed.share == 0.75
    generator = torch.Generator().manual_seed(0)
    draws = [mixed.sample_batch(2, generator) for _ in range(4000)]
    share = sum(regular for _, regular in draws) / len(draws)
    assert abs(share - 0.75) < 0.03
    assert all(batch.prompts[0] == "a photo of a shape" for batch, regular in draws if regular)
    assert all(batch.prompts[0] != "a photo of a shape" for batch, regular in draws if not regular)
    alone = RegularisedBatches(latents(train), None)
    assert alone.share == 0 and not any(alone.sample_batch(2, generator)[1] for _ in range(50))


def test_the_batch_loss_weight_multiplies_the_loss():
    bundle = build_tiny("sd1")
    objective = Objective(bundle, TrainConfig(train_snr_gamma=0))
    latent, cond = torch.randn(2, 4, 8, 8), bundle.encode_text(["a", "b"]).detach()

    def loss(*weight: torch.Tensor) -> torch.Tensor:
        step = objective.denoising_step(bundle, lambda _i: (latent, cond, None, None, *weight), torch.Generator().manual_seed(0))
        with torch.no_grad():
            return step.loss(step.inputs(0))

    assert torch.allclose(loss(torch.tensor(2.5)), 2.5 * loss())
    assert float(loss(torch.tensor(0.0))) == 0.0


def test_lora_training_draws_the_regularisation_images(folders, tmp_path):
    train, reg = folders
    bundle = build_tiny("sd1")
    encoded: list[str] = []  # the prompts the run tokenizes (the frozen text encoder encodes each once)
    tokenize = bundle.tokenize
    bundle.tokenize = lambda prompts: encoded.extend(prompts) or tokenize(prompts)  # type: ignore[method-assign]
    base = dataclasses.replace(
        demo_config(train, iterations=8), logging_save_csv=False, network_blocks=["IN01", "OUT02"]
    )
    with_reg = dataclasses.replace(base, reg_data_directory=str(reg), reg_num_multiply=2, reg_loss_weight=0.5)

    def run(config, name: str, model=None):
        return run_training(RunContext(config, model or build_tiny("sd1"), OutputDirs(tmp_path / name, tmp_path, tmp_path)))

    regularised = run(with_reg, "reg", bundle)
    assert "a photo of a shape" in encoded and "demo style, a photo of a shape" not in encoded
    plain = run(base, "plain")
    assert regularised.steps == 8 and regularised.losses != plain.losses
    assert run(dataclasses.replace(with_reg, reg_loss_weight=1.0), "weight").losses != regularised.losses
    assert any("reg data directory" in p for p in dataclasses.replace(base, reg_data_directory="/nonexistent").problems())
