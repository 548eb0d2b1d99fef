"""The int8 model precision: torchao int8 weight-only UNet Linear layers, the LoRA trains on top; refused with a
message where torchao is missing and on a model TrainTrain did not load itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import traintrain.models.int8 as int8
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.open import open_model
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training


def unet_linears(bundle) -> list[nn.Linear]:
    return [m for m in bundle.components.unet.modules() if isinstance(m, nn.Linear)]


def test_int8_unet_trains_a_lora(tmp_path) -> None:
    images = write_sample_images(tmp_path / "images")
    config = dataclasses.replace(demo_config(images, iterations=40), train_model_precision="int8")
    bundle = open_model("tiny", precision="int8")
    linears = unet_linears(bundle)
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    reference = build_tiny("sd1")
    x = torch.randn(2, 32)
    first = next(m for m in reference.components.unet.modules() if isinstance(m, nn.Linear) and m.in_features == 32)
    name = next(n for n, m in reference.components.unet.named_modules() if m is first)
    quantized = bundle.components.unet.get_submodule(name)
    error = (quantized(x) - first(x)).abs().max() / first(x).abs().max()
    assert 0 < error < 0.02, f"int8 weights: close to the fp32 layer, not identical ({error:.4f})"
    result = run_training(RunContext(config, bundle, OutputDirs(tmp_path / "L", tmp_path / "g", tmp_path / "j")))
    assert result.path.is_file()
    early, late = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert late < early, f"loss falls on the int8 UNet ({early:.4f} → {late:.4f})"


def test_int8_without_torchao_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(int8, "torchao_available", lambda: False)
    with pytest.raises(TrainTrainError, match="needs the torchao package"):
        open_model("tiny", precision="int8")


def test_int8_on_a_model_not_loaded_as_int8_is_refused(tmp_path) -> None:
    images = write_sample_images(tmp_path / "images")
    config = dataclasses.replace(demo_config(images, iterations=2), train_model_precision="int8")
    with pytest.raises(TrainTrainError, match="standalone UI / CLI"):
        run_training(RunContext(config, build_tiny("sd1"), OutputDirs(tmp_path / "L", tmp_path / "g", tmp_path / "j")))
