"""LoKr and DoRA trained on the tiny SD1 / SDXL models: the loss falls, the file holds the modules and key names the
WebUI maps (the same kohya names as LoCon), and the file applied by hand under the WebUI's LoKr / DoRA rules gives
exactly the trained network's output; a file loads back into the same network."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_network_types import (
    ALPHA, CONV_ALPHA, CONV_RANK, ITERATIONS, LEARNING_RATE, RANK, assert_loss_falls, assert_same_outputs,
    expected_modules, hooked_outputs, model_layers, outputs, train, Trained,
)  # fmt: skip

from traintrain.demo import demo_config, write_sample_images
from traintrain.models.diffusers_backend import DiffusersBundle
from traintrain.models.tiny import build_tiny_components
from traintrain.networks.kohya_io import module_names, network_from_file, read_network_file
from traintrain.networks.lokr import factorize

PARTS = {
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module", params=[(k, t) for k in ("sd1", "sdxl") for t in PARTS], ids=lambda p: "-".join(p))
def trained(request, images, tmp_path_factory) -> Trained:
    kind, network_type = request.param
    config = dataclasses.replace(
        demo_config(images, iterations=ITERATIONS), network_type=network_type, network_rank=RANK, network_alpha=ALPHA,
        network_conv_rank=CONV_RANK, network_conv_alpha=CONV_ALPHA, train_learning_rate=LEARNING_RATE,
        save_precision="fp32", logging_save_csv=False, save_lora_name=f"{kind}-{network_type}",
    )  # fmt: skip
    bundle, network, result = train(tmp_path_factory.mktemp("run"), config, kind)
    tensors, metadata = read_network_file(result.path)
    return Trained(kind, network_type, bundle, network, result, tensors, metadata)


def webui_delta(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """What the WebUI adds to a layer's weight at multiplier 1, by its rules for LoKr and DoRA modules."""
    alpha = float(tensors[f"{name}.alpha"])
    if f"{name}.lokr_w1" in tensors:
        w1, w2b = tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2_b"]
        w2 = tensors[f"{name}.lokr_w2_a"] @ w2b
        return torch.kron(w1, w2).reshape(weight.shape) * (alpha / w2b.shape[0])
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    merged = weight + updown * (alpha / down.shape[0])
    inputs = merged.shape[1]  # the magnitude is per input channel: norms over outputs (and the kernel)
    norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(inputs, *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (tensors[f"{name}.dora_scale"] / norm) - weight


def test_factorize_is_the_nearest_divisor_pair():
    assert [factorize(n) for n in (1, 7, 12, 32, 320, 1280)] == [(1, 1), (1, 7), (3, 4), (4, 8), (16, 20), (32, 40)]


def test_loss_falls(trained: Trained, images: Path) -> None:
    assert_loss_falls(trained.bundle, trained.network, trained.result.losses, images)


def test_file_holds_every_module_with_the_names_the_webui_maps(trained: Trained) -> None:
    layers = model_layers(build_tiny_components(trained.kind))
    assert module_names(trained.tensors) == expected_modules(layers, "c3lier")
    for name in module_names(trained.tensors):
        assert {k.split(".", 1)[1] for k in trained.tensors if k.startswith(name + ".")} == PARTS[trained.network_type]
        if trained.network_type == "dora":
            weight = layers[name][1].weight
            assert trained.tensors[f"{name}.dora_scale"].shape == (1, weight.shape[1], *[1] * (weight.dim() - 2))
    meta = trained.metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_type"] == trained.network_type


def test_file_applied_by_hand_equals_the_trained_network(trained: Trained) -> None:
    hooked, base = hooked_outputs(trained), outputs(trained.bundle)
    assert (hooked["unet"] - base["unet"]).abs().max() > 1e-2, "the trained network must change the UNet output"
    components = build_tiny_components(trained.kind)
    layers = model_layers(components)
    with torch.no_grad():
        for name in module_names(trained.tensors):
            weight = layers[name][1].weight
            weight += webui_delta(trained.tensors, name, weight)
    assert_same_outputs(outputs(DiffusersBundle(components)), hooked)


def test_file_loads_back_into_the_same_network(trained: Trained) -> None:
    reloaded = network_from_file(trained.result.path, trained.bundle.lora_targets())
    assert reloaded.spec.network_type == trained.network_type
    assert {type(a) for a in reloaded.adapters.values()} == {type(a) for a in trained.network.adapters.values()}
    with reloaded.applied():
        again = outputs(trained.bundle)
    assert_same_outputs(again, hooked_outputs(trained))
