"""The model a bench times: the tiny model, or a random-weight full-size SD1.5 / SDXL from the shipped configs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from torch import nn

from traintrain.bench.settings import MODELS
from traintrain.models.bundle import ModelBundle, ModelKind

if TYPE_CHECKING:  # diffusers and the modes are imported when a bench runs, not to parse the command line
    from traintrain.models.diffusers_backend import Components



def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Real storage on `device` in `dtype` for the parameters of a module built on the meta device, initialised by each
    layer's own `reset_parameters` (PyTorch's default init); buffers (built on the CPU) move along."""
    with torch.no_grad():
        for layer in module.modules():
            meta = [(name, p) for name, p in layer.named_parameters(recurse=False) if p.is_meta]
            for name, p in meta:
                empty = torch.empty(p.shape, device=device, dtype=dtype)
                setattr(layer, name, nn.Parameter(empty, requires_grad=False))
            if meta:
                layer.reset_parameters()  # every layer of the SD UNet, VAE and CLIP has one
    return module.to(device).eval()


def random_components(kind: ModelKind, device: torch.device, dtype: torch.dtype) -> Components:
    """Full-size SD1.5 / SDXL components with random weights from the shipped configs: built on the meta device and
    materialised directly on `device` (UNet and text encoders in `dtype`, VAE in fp32), so nothing is downloaded."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from traintrain.models.checkpoint import TEXT_SUBFOLDERS, shipped_config_dir
    from traintrain.models.diffusers_backend import Components, ddpm_alphas_cumprod
    from traintrain.models.tiny import OPEN_CLIP_PAD
    from traintrain.models.tokenizer import END, clip_bpe_tokenizer

    folder = shipped_config_dir(kind)
    classes = [CLIPTextModel] if kind == "sd1" else [CLIPTextModel, CLIPTextModelWithProjection]
    pads = [END, OPEN_CLIP_PAD][: len(classes)]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        encoders = [
            cls(CLIPTextConfig.from_pretrained(str(folder), subfolder=sub, local_files_only=True))
            for cls, (sub, _) in zip(classes, TEXT_SUBFOLDERS)
        ]
    materialise(unet, device, dtype)
    materialise(vae, device, torch.float32)
    for encoder in encoders:
        materialise(encoder, device, dtype)
    tokenizers = [clip_bpe_tokenizer(pad) for pad in pads]
    return Components(unet, vae, encoders, tokenizers, kind, "epsilon", ddpm_alphas_cumprod())


def bench_bundle(model: str, device: torch.device, dtype: torch.dtype, adapter: str = "diffusers") -> ModelBundle:
    """The model to time: the tiny SD1 model, or a random-weight full-size SD1.5 / SDXL; with adapter "ldm", SD1.5 in
    the WebUI's model layout behind the WebUI adapter (run it inside `webui_unet_patches`)."""
    from traintrain.models.diffusers_backend import DiffusersBundle

    if adapter == "ldm":
        from traintrain.bench.webui_layout import random_webui_sd15
        from traintrain.models.ldm_bundle import LdmBundle

        return LdmBundle(random_webui_sd15(device, dtype), device=device, dtype=dtype)
    if model == "tiny":
        from traintrain.models.tiny import build_tiny_components

        components = build_tiny_components("sd1")
    else:
        components = random_components(MODELS[model], device, dtype)
    return DiffusersBundle(components, device=device, dtype=dtype)
