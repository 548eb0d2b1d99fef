"""Block and element selection: a ticked block gets exactly its layers (checked against LDM's block numbering, counted
independently here), unticked blocks get nothing, CrossAttention / SelfAttention keep exactly attn2 / attn1, and BASE
(the text encoders) is trained only in LoRA mode. Real-size SD1.5 / SDXL layouts are checked on the meta device."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP

from traintrain.config import TrainConfig
from traintrain.config_fields import BLOCKS_SD
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import LoraTarget
from traintrain.models.checkpoint import shipped_config_dir
from traintrain.models.diffusers_backend import DiffusersBundle
from traintrain.models.ldm_convert import unet_ldm_to_diffusers_names
from traintrain.models.targets import collect_targets, unet_kohya_paths
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.modes.common import LoraWriter, build_network, network_spec
from traintrain.networks.kohya_io import module_names, read_network_file
from traintrain.networks.network import NetworkSpec

TYPES = ("lierla", "c3lier", "loha")
ELEMENT_ATTENTION = {"CrossAttention": True, "SelfAttention": False}  # element -> Attention.is_cross_attention


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def layer_paths(part: nn.Module, inside: tuple[type, ...] | None = None) -> list[str]:
    """Paths of the Linear / Conv2d layers of `part` (only those within a module of type `inside`, when given)."""
    containers = [p for p, m in part.named_modules() if inside and isinstance(m, inside)]
    return [
        path
        for path, module in part.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        and (inside is None or any(path.startswith(c + ".") for c in containers))
    ]


@dataclasses.dataclass
class Model:
    """A UNet and its text encoders (with kohya prefixes), and the LoRA targets the trainer finds on them."""

    unet: nn.Module
    encoders: list[tuple[str, nn.Module]]
    targets: list[LoraTarget]
    kind: str

    def unet_name(self, path: str) -> str:
        """kohya's name of a UNet layer: SDXL by its LDM path (compvis-style), SD1 / SD2 by its diffusers path."""
        if self.kind != "sdxl":
            return kohya_name("lora_unet", path)
        return kohya_name("lora_unet", ldm_paths(self.unet)[path])

    def text_layers(self) -> set[str]:
        """kohya names of the text encoders' attention and MLP linears (BASE)."""
        return {
            kohya_name(prefix, path if path.startswith("text_model.") else "text_model." + path)
            for prefix, encoder in self.encoders
            for path in layer_paths(encoder, (CLIPAttention, CLIPMLP))
        }

    def block_layers(self, block: str, network_type: str) -> set[str]:
        """kohya names of the layers `network_type` wraps in `block`: lierla only inside Transformer2DModels."""
        if block == "BASE":
            return self.text_layers()
        prefixes = ldm_block_paths(self.unet).get(block, [])
        inside = (Transformer2DModel,) if network_type == "lierla" else None
        return {
            self.unet_name(path)
            for path in layer_paths(self.unet, inside)
            if any(path.startswith(prefix + ".") for prefix in prefixes)
        }

    def attention_layers(self, cross: bool) -> set[str]:
        """kohya names of the UNet's cross- (or self-) attention projections."""
        attentions = [p for p, m in self.unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention == cross]
        return {
            self.unet_name(path) for path in layer_paths(self.unet) if any(path.startswith(a + ".") for a in attentions)
        }


@functools.cache
def ldm_paths(unet: nn.Module) -> dict[str, str]:
    """LDM path of every diffusers UNet module with parameters (the single-file checkpoint converter's map)."""
    return {hf: ldm for ldm, hf in unet_ldm_to_diffusers_names(unet.config).items()}


def ldm_block_paths(unet: nn.Module) -> dict[str, list[str]]:
    """diffusers module paths per WebUI block, counted the way LDM lays out its UNet: IN00 is conv_in, then each down
    level's layers (resnet + attention) and its downsampler; M00 the mid block; OUT00… each up level's layers, the
    level's last layer carrying its upsampler."""
    blocks: dict[str, list[str]] = {}
    number = 1
    for i, down in enumerate(unet.down_blocks):
        for j in range(len(down.resnets)):
            blocks[f"IN{number:02d}"] = [f"down_blocks.{i}.resnets.{j}", f"down_blocks.{i}.attentions.{j}"]
            number += 1
        if down.downsamplers:
            blocks[f"IN{number:02d}"] = [f"down_blocks.{i}.downsamplers"]
            number += 1
    blocks["M00"] = ["mid_block"]
    number = 0
    for i, up in enumerate(unet.up_blocks):
        for j in range(len(up.resnets)):
            blocks[f"OUT{number:02d}"] = [f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}"]
            number += 1
        if up.upsamplers:
            blocks[f"OUT{number - 1:02d}"].append(f"up_blocks.{i}.upsamplers")
    return blocks


def tiny_model(bundle: DiffusersBundle) -> Model:
    c = bundle.components
    prefixes = ["lora_te"] if len(c.text_encoders) == 1 else ["lora_te1", "lora_te2"]
    return Model(c.unet, list(zip(prefixes, c.text_encoders)), bundle.lora_targets(), c.kind)


def real_size_model(kind: str) -> Model:
    """SD1.5 or SDXL-base from the shipped diffusers configs, on the meta device (no memory, no weights)."""
    folder = shipped_config_dir(kind)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        encoders = [("lora_te", CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")))]
        if kind == "sdxl":
            config_2 = CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")
            encoders = [("lora_te1", encoders[0][1]), ("lora_te2", CLIPTextModelWithProjection(config_2))]
    targets = collect_targets(unet, encoders, unet.config.layers_per_block, unet_kohya_paths(kind, unet.config))
    return Model(unet, encoders, targets, kind)


MODELS = {
    "tiny-sd1": lambda: tiny_model(build_tiny("sd1")),
    "tiny-sdxl": lambda: tiny_model(build_tiny("sdxl")),
    "sd15": lambda: real_size_model("sd1"),
    "sdxl": lambda: real_size_model("sdxl"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> Model:
    return MODELS[request.param]()


def selected(model: Model, spec: NetworkSpec) -> set[str]:
    return {t.name for t in model.targets if spec.accepts(t)}


@pytest.mark.parametrize("network_type", TYPES)
def test_each_block_selects_exactly_its_layers(model: Model, network_type: str) -> None:
    everything: set[str] = set()
    for block in BLOCKS_SD:
        expected = model.block_layers(block, network_type)
        assert selected(model, NetworkSpec(network_type, blocks=[block])) == expected, block
        everything |= expected
    assert selected(model, NetworkSpec(network_type, blocks=list(BLOCKS_SD))) == everything
    assert selected(model, NetworkSpec(network_type)) == everything, "no layer outside the 26 blocks is trained"


def blocks_with_modules(model: Model, network_type: str) -> set[str]:
    return {b for b in BLOCKS_SD if selected(model, NetworkSpec(network_type, blocks=[b]))}


def numbered(prefix: str, numbers: list[int] | range) -> set[str]:
    return {f"{prefix}{n:02d}" for n in numbers}


@pytest.mark.parametrize(
    "kind, network_type, expected",
    [
        ("sd1", "lierla", {"BASE", "M00"} | numbered("IN", [1, 2, 4, 5, 7, 8]) | numbered("OUT", range(3, 12))),
        ("sd1", "c3lier", {"BASE", "M00"} | numbered("IN", range(1, 12)) | numbered("OUT", range(12))),
        ("sdxl", "lierla", {"BASE", "M00"} | numbered("IN", [4, 5, 7, 8]) | numbered("OUT", range(6))),
        ("sdxl", "loha", {"BASE", "M00"} | numbered("IN", range(1, 9)) | numbered("OUT", range(9))),
    ],
)
def test_real_size_blocks_holding_modules(kind: str, network_type: str, expected: set[str]) -> None:
    """The reference's table: which of the 26 blocks hold modules on SD1.5 / SDXL per network type (IN00 never)."""
    assert blocks_with_modules(real_size_model(kind), network_type) == expected


@pytest.mark.parametrize("element", list(ELEMENT_ATTENTION))
@pytest.mark.parametrize("network_type", ["lierla", "c3lier"])
def test_element_keeps_exactly_cross_or_self_attention(model: Model, network_type: str, element: str) -> None:
    expected = model.attention_layers(cross=ELEMENT_ATTENTION[element])
    suffix = "_attn2_" if element == "CrossAttention" else "_attn1_"
    assert expected and all(suffix in name for name in expected)
    assert selected(model, NetworkSpec(network_type, element=element, blocks=list(BLOCKS_SD))) == expected
    only_mid = selected(model, NetworkSpec(network_type, element=element, blocks=["M00"]))
    assert only_mid == expected & model.block_layers("M00", network_type) and only_mid


# --- the saved files (real network building and writing on the tiny models) ---


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")


def trained_modules(tmp: Path, config: TrainConfig, bundle: DiffusersBundle) -> set[str]:
    """Module names of the file a real training run writes."""
    result = run_training(RunContext(config, bundle, dirs_in(tmp)))
    tensors, _ = read_network_file(result.path)
    return module_names(tensors)


def saved_modules(tmp: Path, model_bundle: DiffusersBundle, config: TrainConfig) -> set[str]:
    """Build the LoRA-mode network for `config` and write it as the trainer does; the file's module names."""
    ctx = RunContext(config, model_bundle, dirs_in(tmp))
    network = build_network(ctx, config, text_encoder="BASE" in config.network_blocks)
    path = LoraWriter(ctx, config, network, "blocks", {}).save("", 0)
    tensors, _ = read_network_file(path)
    return module_names(tensors)


TINY_BLOCKS = {  # blocks holding layers on the tiny models: two levels of one layer each, attention on one level
    ("sd1", "lierla"): {"BASE", "IN01", "M00", "OUT02", "OUT03"},
    ("sd1", "c3lier"): {"BASE", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"},
    ("sdxl", "lierla"): {"BASE", "IN03", "M00", "OUT00", "OUT01"},
    ("sdxl", "c3lier"): {"BASE", "IN01", "IN02", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"},
}


@pytest.mark.parametrize("network_type", TYPES)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_saved_file_holds_only_the_ticked_block(images, tmp_path, kind: str, network_type: str) -> None:
    """Every block ticked alone: the written file holds all of that block's layers and no other; an empty block is
    a clear error."""
    bundle = build_tiny(kind)
    model = tiny_model(bundle)
    base = dataclasses.replace(demo_config(images), network_type=network_type, network_rank=2, network_alpha=1)
    holding = set()
    for block in BLOCKS_SD:
        expected = model.block_layers(block, network_type)
        config = dataclasses.replace(base, network_blocks=[block])
        if not expected:
            with pytest.raises(TrainTrainError, match="No layer matches"):
                saved_modules(tmp_path, bundle, config)
            continue
        holding.add(block)
        assert saved_modules(tmp_path, bundle, config) == expected, block
    assert holding == TINY_BLOCKS[kind, "lierla" if network_type == "lierla" else "c3lier"]
    if kind == "sdxl":
        prefixes = {name.split("_text_model_")[0] for name in model.block_layers("BASE", network_type)}
        assert prefixes == {"lora_te1", "lora_te2"}


def test_training_run_saves_only_ticked_blocks(images, tmp_path) -> None:
    """A real SDXL c3lier run with BASE, IN03 and OUT02 ticked: the file holds those blocks' layers, nothing else."""
    blocks = ["BASE", "IN03", "OUT02"]
    config = dataclasses.replace(
        demo_config(images, iterations=3), network_type="c3lier", network_blocks=blocks, logging_save_csv=False
    )
    bundle = build_tiny("sdxl")
    model = tiny_model(bundle)
    expected = set().union(*(model.block_layers(b, "c3lier") for b in blocks))
    assert trained_modules(tmp_path, config, bundle) == expected
    assert any(n.startswith("lora_te1_") for n in expected) and any(n.startswith("lora_te2_") for n in expected)


def test_training_run_with_cross_attention_element(images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, iterations=3), network_element="CrossAttention")
    bundle = build_tiny("sd1")
    assert trained_modules(tmp_path, config, bundle) == tiny_model(bundle).attention_layers(cross=True)


def test_loha_refuses_an_attention_element(images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, iterations=2), network_type="loha", network_element="SelfAttention")
    with pytest.raises(TrainTrainError, match="not available with loha"):
        run_training(RunContext(config, build_tiny("sd1"), dirs_in(tmp_path)))
    assert not (tmp_path / "Lora").exists() or not list((tmp_path / "Lora").iterdir())


def test_base_is_not_trained_outside_lora_mode(images, tmp_path) -> None:
    """iLECO (like Difference and ADDifT) trains the UNet only: a ticked BASE adds no text-encoder module, and BASE
    alone is an error (it once meant every UNet block, the spec reading an empty block list as 'all')."""
    config = dataclasses.replace(
        demo_config(images, iterations=2),
        mode="iLECO",
        original_prompt="a red circle",
        target_prompt="a blue square",
        network_blocks=["BASE", "M00", "OUT03"],
        logging_save_csv=False,
    )
    assert network_spec(config, text_encoder=False).blocks == ["M00", "OUT03"]
    bundle = build_tiny("sd1")
    model = tiny_model(bundle)
    expected = model.block_layers("M00", "lierla") | model.block_layers("OUT03", "lierla")
    assert trained_modules(tmp_path, config, bundle) == expected
    only_base = dataclasses.replace(config, network_blocks=["BASE"], save_lora_name="base_only")
    with pytest.raises(TrainTrainError, match="No layer matches"):
        run_training(RunContext(only_base, bundle, dirs_in(tmp_path)))
    assert not (tmp_path / "Lora" / "base_only.safetensors").exists()
