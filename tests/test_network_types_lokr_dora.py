"""LoKr, DoRA and LoHa with Tucker factors trained on the tiny SD1 / SDXL models: the loss falls, the file holds the
modules and key names the WebUI maps (the same kohya names as LoCon), and the file applied by hand under the WebUI's
LoKr / DoRA / LoHa rules gives exactly the trained network's output; a file loads back into the same network."""

from __future__ import annotations

import dataclasses
import json
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

LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
PARTS = {
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha-tucker": LOHA | {"hada_t1", "hada_t2"},  # 3×3 convs; the others keep LoHa's keys
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module", params=[(k, t) for k in ("sd1", "sdxl") for t in PARTS], ids=lambda p: "-".join(p))
def trained(request, images, tmp_path_factory) -> Trained:
    kind, variant = request.param
    network_type, tucker = variant.split("-")[0], variant.endswith("tucker")
    config = dataclasses.replace(
        demo_config(images, iterations=ITERATIONS), network_type=network_type, network_loha_tucker=tucker,
        network_rank=RANK, network_alpha=ALPHA,
        network_conv_rank=CONV_RANK, network_conv_alpha=CONV_ALPHA, train_learning_rate=LEARNING_RATE,
        save_precision="fp32", logging_save_csv=False, save_lora_name=f"{kind}-{network_type}",
    )  # fmt: skip
    bundle, network, result = train(tmp_path_factory.mktemp("run"), config, kind)
    tensors, metadata = read_network_file(result.path)
    return Trained(kind, variant, bundle, network, result, tensors, metadata)


def cp_rebuild(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The WebUI's Tucker rebuild, in its two steps: core ×₂ down, then ×₁ up."""
    partial = torch.einsum("i j k l, j r -> i r k l", core, down)
    return torch.einsum("i j k l, i r -> r j k l", partial, up)


def webui_delta(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """What the WebUI adds to a layer's weight at multiplier 1, by its rules for LoKr and DoRA modules."""
    alpha = float(tensors[f"{name}.alpha"])
    if f"{name}.hada_w1_a" in tensors:
        w1a, w1b, w2a, w2b = (tensors[f"{name}.hada_{part}"] for part in ("w1_a", "w1_b", "w2_a", "w2_b"))
        if f"{name}.hada_t1" in tensors:
            first = cp_rebuild(tensors[f"{name}.hada_t1"], w1a, w1b)
            second = cp_rebuild(tensors[f"{name}.hada_t2"], w2a, w2b)
        else:
            first, second = w1a @ w1b.flatten(1), w2a @ w2b.flatten(1)
        return (first * second).reshape(weight.shape) * (alpha / w1b.shape[0])
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
    tucker = trained.network_type == "loha-tucker"
    for name in module_names(trained.tensors):
        weight = layers[name][1].weight
        parts = {k.split(".", 1)[1] for k in trained.tensors if k.startswith(name + ".")}
        spatial = weight.dim() == 4 and weight.shape[2:] != (1, 1)
        assert parts == (PARTS[trained.network_type] if spatial or not tucker else LOHA), name
        if tucker and spatial:
            assert trained.tensors[f"{name}.hada_t1"].shape == (CONV_RANK, CONV_RANK, *weight.shape[2:])
            assert trained.tensors[f"{name}.hada_w1_a"].shape == (CONV_RANK, weight.shape[0])
        if trained.network_type == "dora":
            assert trained.tensors[f"{name}.dora_scale"].shape == (1, weight.shape[1], *[1] * (weight.dim() - 2))
    meta = trained.metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_type"] == trained.network_type.split("-")[0]
    assert ("use_tucker" in json.loads(meta["ss_network_args"])) == tucker


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
    assert reloaded.spec.network_type == trained.network_type.split("-")[0]
    assert reloaded.spec.tucker == trained.network_type.endswith("tucker")
    assert {type(a) for a in reloaded.adapters.values()} == {type(a) for a in trained.network.adapters.values()}
    with reloaded.applied():
        again = outputs(trained.bundle)
    assert_same_outputs(again, hooked_outputs(trained))
