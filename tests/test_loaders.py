"""Saved files against loaders no one here wrote: LyCORIS from PyPI (its kohya loader, every network type, the ΔW it
applies), and ComfyUI's and A1111's published LoRA key rules (re-implemented below) on the real-size SD1.5 / SDXL
layouts built on the meta device. diffusers / peft loading is tested in test_network_types."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from lycoris.kohya import get_module, make_module
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from traintrain.models.ldm_convert import unet_ldm_namer
from traintrain.models.targets import collect_targets, unet_kohya_paths
from traintrain.models.tiny import build_tiny
from traintrain.networks.kohya_io import module_names, network_tensors, save_network
from traintrain.networks.network import Network, NetworkSpec

CONFIGS = Path(__file__).resolve().parents[1] / "traintrain" / "models" / "configs"
TYPES = ("lierla", "c3lier", "loha")


def spec(network_type: str, rank: int = 4) -> NetworkSpec:
    return NetworkSpec(network_type, rank=rank, alpha=rank / 2, conv_rank=max(1, rank // 2), conv_alpha=1.0)


class LdmNamed(nn.Module):
    """A view of a diffusers UNet whose module names are its LDM paths (the names kohya's SDXL UNet has)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self._namer = unet_ldm_namer(unet.config)

    def named_modules(self, *args, **kwargs) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.unet.named_modules():
            if name.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and isinstance(module, (nn.Linear, nn.Conv2d)):
                yield self._namer(name), module


# ----- LyCORIS (tiny models, real numbers)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("network_type", TYPES)
def test_lycoris_loads_every_module_with_the_same_delta(kind: str, network_type: str, tmp_path: Path) -> None:
    bundle = build_tiny(kind)
    torch.manual_seed(0)
    network = Network.build(spec(network_type), bundle.lora_targets())
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(std=0.5)
    path = save_network(tmp_path / "x.safetensors", network, {}, torch.float32, 1.0)
    parts = bundle.components
    unet = LdmNamed(parts.unet) if kind == "sdxl" else parts.unet
    prefixes = ["lora_te1", "lora_te2"] if kind == "sdxl" else ["lora_te"]
    named = {f"lora_unet_{n}".replace(".", "_"): m for n, m in unet.named_modules()}
    for prefix, encoder in zip(prefixes, parts.text_encoders):
        named.update({f"{prefix}_{n}".replace(".", "_"): m for n, m in encoder.named_modules()})
    weights = load_file(path)
    # LyCORIS' kohya loader: match each file module to a layer by name, then let LyCORIS parse and build it
    loaded = {name: make_module(*get_module(weights, name), name, named[name]) for name in module_names(weights) if name in named}
    assert set(loaded) == module_names(weights) and None not in loaded.values(), "LyCORIS places every module"
    for name, adapter in network.adapters.items():
        layer = named[name]
        expected = adapter.delta_weight().detach()
        module = loaded[name]
        if network_type == "loha":
            actual = module.get_weight(layer.weight.shape)
        else:
            actual = module.get_diff_weight(multiplier=1.0, shape=layer.weight.shape)[0]
        torch.testing.assert_close(actual.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5, msg=name)


# ----- real-size layouts on the meta device, ComfyUI's and A1111's key rules


def real_model(kind: str) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The real SD1.5 / SDXL UNet and text encoders from the shipped configs, weights on the meta device."""
    folder = CONFIGS / {"sd1": "sd15", "sdxl": "sdxl"}[kind]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        encoders = [(CLIPTextModel, "text_encoder", "lora_te1" if kind == "sdxl" else "lora_te")]
        if kind == "sdxl":
            encoders.append((CLIPTextModelWithProjection, "text_encoder_2", "lora_te2"))
        text = [
            (prefix, cls(CLIPTextConfig.from_pretrained(str(folder), subfolder=sub, local_files_only=True)))
            for cls, sub, prefix in encoders
        ]
    return unet, text


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def real(request) -> dict:
    kind = request.param
    unet, text = real_model(kind)
    targets = collect_targets(unet, text, 2, unet_kohya_paths(kind, unet.config))
    weights = {t.name: tuple(t.module.weight.shape) for t in targets}
    files = {}
    for network_type in TYPES:
        network = Network.build(spec(network_type, rank=1), targets)  # adapters on the CPU: shapes are real
        files[network_type] = network_tensors(network, torch.float32)
    namer = unet_ldm_namer(unet.config)
    unet_paths = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    layers = len(text[0][1].text_model.encoder.layers), len(text[-1][1].text_model.encoder.layers)
    return {"kind": kind, "weights": weights, "files": files, "unet": unet_paths, "namer": namer, "layers": layers}


CLIP_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def comfyui_keys(real: dict) -> set[str]:
    """ComfyUI's LoRA key map for SD models: the UNet by LDM path and by diffusers path, the CLIP layers by kohya's
    text-encoder names (lora_te_ for SD1; lora_te1_ / lora_te2_ when CLIP-G is present)."""
    keys = {"lora_unet_" + p.replace(".", "_") for p in real["unet"]}
    keys |= {"lora_unet_" + real["namer"](p).replace(".", "_") for p in real["unet"] if p.startswith(("down", "mid", "up"))}
    prefixes = ["lora_te"] if real["kind"] == "sd1" else ["lora_te1", "lora_te2"]
    for prefix, count in zip(prefixes, real["layers"]):
        keys |= {f"{prefix}_text_model_encoder_layers_{b}_{c}" for b in range(count) for c in CLIP_PARTS}
    return keys


def comfyui_delta_shape(tensors: dict[str, torch.Tensor], name: str, weight: tuple[int, ...]) -> tuple[int, ...]:
    """ComfyUI's weight patch: plain matrix products of the flattened factors, reshaped to the weight (on meta)."""
    meta = {k: v.to("meta") for k, v in tensors.items() if k.startswith(name + ".")}
    if f"{name}.hada_w1_a" in meta:
        w1a, w1b, w2a, w2b = (meta[f"{name}.hada_{p}"] for p in ("w1_a", "w1_b", "w2_a", "w2_b"))
        delta = torch.mm(w1a, w1b) * torch.mm(w2a, w2b)  # a 4-D hada_w*_b fails here ("mat2 must be a matrix")
    else:
        delta = torch.mm(meta[f"{name}.lora_up.weight"].flatten(1), meta[f"{name}.lora_down.weight"].flatten(1))
    return tuple(delta.reshape(weight).shape)


@pytest.mark.parametrize("network_type", TYPES)
def test_comfyui_rules_place_and_patch_every_module(real: dict, network_type: str) -> None:
    tensors = real["files"][network_type]
    names = module_names(tensors)
    assert len(names) > {"sd1": 200, "sdxl": 900}[real["kind"]]
    assert names <= comfyui_keys(real), sorted(names - comfyui_keys(real))[:5]
    for name in names:
        assert comfyui_delta_shape(tensors, name, real["weights"][name]) == real["weights"][name]


_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}  # fmt: skip


def a1111_convert(key: str) -> str:
    """The WebUI's `convert_diffusers_name_to_compvis` (Lora extension), for SD1 / SDXL UNet and text-encoder names."""
    rules = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda i, k, j, s: f"diffusion_model_input_blocks_{1 + int(i) * 3 + int(j)}_{1 if k == 'attentions' else 0}_"
                            f"{_RESNET.get(s, s) if k == 'resnets' else s}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda k, j, s: f"diffusion_model_middle_block_{1 if k == 'attentions' else int(j) * 2}_"
                         f"{_RESNET.get(s, s) if k == 'resnets' else s}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda i, k, j, s: f"diffusion_model_output_blocks_{int(i) * 3 + int(j)}_{1 if k == 'attentions' else 0}_"
                            f"{_RESNET.get(s, s) if k == 'resnets' else s}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda i: f"diffusion_model_input_blocks_{3 + int(i) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda i: f"diffusion_model_output_blocks_{2 + int(i) * 3}_{2 if int(i) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda b, s: f"transformer_text_model_encoder_layers_{b}_{s}"),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda b, s: f"1_model_transformer_resblocks_{b}_"
                      + s.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")),
    ]  # fmt: skip
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return build(*match.groups())
    return key


def a1111_layer_names(real: dict) -> set[str]:
    """The WebUI's `network_layer_mapping` names of the LDM model: diffusion_model_<LDM path>, the CLIP-L wrapper
    (`transformer_…`, SDXL `0_transformer_…`) and SDXL's OpenCLIP-G (`1_model_transformer_resblocks_…`)."""
    names = {"diffusion_model_" + real["namer"](p).replace(".", "_") for p in real["unet"] if p.startswith(("down", "mid", "up"))}
    clip_l = "transformer_text_model" if real["kind"] == "sd1" else "0_transformer_text_model"
    names |= {f"{clip_l}_encoder_layers_{b}_{c}" for b in range(real["layers"][0]) for c in CLIP_PARTS}
    if real["kind"] == "sdxl":
        names |= {f"1_model_transformer_resblocks_{b}_{c}" for b in range(real["layers"][1])
                  for c in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}  # fmt: skip
    return names


def a1111_lookup(name: str, layers: set[str]) -> str | None:
    """The WebUI's lookup order: converted name, its fused-qkv module, then the compvis names SDXL files carry."""
    key = a1111_convert(name)
    if key in layers:
        return key
    fused = re.fullmatch(r"(.*)_([qkv]_proj)", key)
    if fused and fused.group(1) in layers:
        return fused.group(1)
    for old, new in (("lora_unet", "diffusion_model"), ("lora_te1_text_model", "0_transformer_text_model")):
        if old in name and name.replace(old, new) in layers:
            return name.replace(old, new)
    return None


@pytest.mark.parametrize("network_type", TYPES)
def test_a1111_rules_find_every_module(real: dict, network_type: str) -> None:
    layers = a1111_layer_names(real)
    missing = [n for n in module_names(real["files"][network_type]) if a1111_lookup(n, layers) is None]
    assert missing == []
