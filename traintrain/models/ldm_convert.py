"""Diffusers → LDM (A1111 single-file) naming: module-name maps, state-dict conversion and a .safetensors writer.

LDM indices are derived from the UNet config (any layers_per_block and block types), so the same code serves the
real SD1/SD2/SDXL models, the tiny test models and the WebUI adapter's name mapping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import torch

from traintrain.files import save_safetensors

if TYPE_CHECKING:
    from traintrain.models.diffusers_backend import Components

TextLayout = Literal["hf", "openclip"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"  # the marker key some v-prediction checkpoints carry (read by A1111 dev)

# Per model kind: the checkpoint prefix and key layout of each text encoder, in Components.text_encoders order.
TEXT_ENCODER_SLOTS: dict[str, list[tuple[str, TextLayout]]] = {
    "sd1": [("cond_stage_model.", "hf")],
    "sd2": [("cond_stage_model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.", "hf"), ("conditioner.embedders.1.", "openclip")],
}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.q_proj": "attn.q_proj",  # q/k/v are slices of the fused attn.in_proj_weight in OpenCLIP
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_TOP = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _per_block(value: int | list[int] | tuple[int, ...], count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * count


def _unet_blocks(config: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """Diffusers block prefix → (LDM prefix, is a resnet) for every resnet, attention and resampler of the UNet."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down_types))
    blocks: dict[str, tuple[str, bool]] = {}
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", True)
            if "Attn" in block_type:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", False)
            index += 1
        if i < len(down_types) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", False)
            index += 1
    for r in range(2):
        blocks[f"mid_block.resnets.{r}"] = (f"middle_block.{2 * r}", True)
    blocks["mid_block.attentions.0"] = ("middle_block.1", False)
    index = 0
    for i, (block_type, count) in enumerate(zip(up_types, reversed(layers))):
        attention = "Attn" in block_type
        for j in range(count + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", True)
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", False)
            if j == count and i < len(up_types) - 1:
                blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (
                    f"output_blocks.{index}.{2 if attention else 1}.conv",
                    False,
                )
            index += 1
    return blocks


def _unet_name_to_ldm(name: str, blocks: dict[str, tuple[str, bool]]) -> str:
    """The LDM name of a diffusers UNet module or tensor name."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if head in _UNET_TOP:
            return ".".join([_UNET_TOP[head], *rest])
        if head in blocks:
            ldm, is_resnet = blocks[head]
            if is_resnet and rest and rest[0] in _UNET_RESNET:
                rest = [_UNET_RESNET[rest[0]], *rest[1:]]
            return ".".join([ldm, *rest])
    raise ValueError(f"No LDM name for the UNet tensor {name!r}: this UNet layout is not supported.")


def _param_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that own parameters directly (Linear, Conv2d, norms, embeddings)."""
    return [name for name, module in model.named_modules() if name and list(module.parameters(recurse=False))]


def unet_ldm_namer(config: Mapping[str, Any]) -> Callable[[str], str]:
    """A function giving the LDM name of any diffusers module or tensor name of the UNet described by `config`."""
    blocks = _unet_blocks(config)
    return lambda name: _unet_name_to_ldm(name, blocks)


def unet_ldm_to_diffusers_names(config: Mapping[str, Any]) -> dict[str, str]:
    """LDM module name → diffusers module name for every UNet module with parameters, derived from the UNet config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(dict(config))
    blocks = _unet_blocks(config)
    return {_unet_name_to_ldm(name, blocks): name for name in _param_module_names(unet)}


def unet_state_dict_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict with LDM keys (no `model.diffusion_model.` prefix)."""
    blocks = _unet_blocks(config)
    return {_unet_name_to_ldm(key, blocks): value for key, value in state_dict.items()}


def _vae_name_to_ldm(name: str, up_blocks: int) -> str:
    """The LDM name of a diffusers VAE tensor name."""
    name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", name)
    name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
    name = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.block.", name)
    name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{up_blocks - 1 - int(m[1])}.upsample.", name)
    name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
    attention = re.match(r"(.*)mid_block\.attentions\.0\.(.*)\.(weight|bias)$", name)
    if attention:
        head, module, param = attention.groups()
        name = f"{head}mid.attn_1.{_VAE_ATTENTION.get(module, module)}.{param}"
    return name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def vae_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict with LDM keys; attention projections become the 1×1 convs LDM uses."""
    out = {}
    for key, value in state_dict.items():
        ldm = _vae_name_to_ldm(key, up_blocks)
        is_projection = ".mid.attn_1." in f".{ldm}" and ldm.endswith("weight") and value.ndim == 2
        out[ldm] = value[:, :, None, None] if is_projection else value
    return out


def _hf_relative(name: str) -> str:
    """A CLIP module/tensor name inside `text_model` (transformers 5 drops that prefix from CLIPTextModel; G2)."""
    return name[len("text_model.") :] if name.startswith("text_model.") else name


def _openclip_name(name: str) -> str:
    """The OpenCLIP name (under `model.`) of a CLIP module name relative to `text_model`."""
    layer = re.match(r"encoder\.layers\.(\d+)\.(.*)$", name)
    if layer:
        return f"transformer.resblocks.{layer[1]}.{_OPENCLIP_LAYER[layer[2]]}"
    return _OPENCLIP_TOP[name]


def _clip_module_names(num_layers: int) -> list[str]:
    """CLIP text-model module names (relative to `text_model`) that have an LDM counterpart in both layouts."""
    per_layer = [f"encoder.layers.{i}.{suffix}" for i in range(num_layers) for suffix in _OPENCLIP_LAYER]
    return [*_OPENCLIP_TOP, *per_layer]


def text_encoder_ldm_to_diffusers_names(layout: TextLayout, num_layers: int) -> dict[str, str]:
    """LDM module name, relative to the embedder (`transformer.text_model.…` / `model.transformer.resblocks.N.…`),
    → HF CLIP module name (`text_model.…`). OpenCLIP q/k/v are named `…attn.{q,k,v}_proj`: rows of `in_proj_weight`."""
    names = _clip_module_names(num_layers)
    if layout == "hf":
        return {f"transformer.text_model.{name}": f"text_model.{name}" for name in names}
    return {f"model.{_openclip_name(name)}": f"text_model.{name}" for name in names}


def _openclip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model state dict in the OpenCLIP layout (fused in_proj, transposed text_projection)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _hf_relative(key)
        module, _, param = key.rpartition(".")
        if module == "embeddings.position_embedding":
            out["positional_embedding"] = value
        elif module == "text_projection":
            out["text_projection"] = value.T.contiguous()
        elif module != "embeddings":  # embeddings.position_ids: a buffer OpenCLIP does not have
            out[f"{_openclip_name(module)}.{param}"] = value
    for fused in [key for key in out if ".attn.q_proj." in key]:
        head, param = fused.split(".attn.q_proj.")
        parts = [out.pop(f"{head}.attn.{p}_proj.{param}") for p in "qkv"]
        out[f"{head}.attn.in_proj_{param}"] = torch.cat(parts)
    if "text_projection" not in out:  # CLIPTextModel (SD2) keeps no projection; the loader reads its width from here
        width = out["positional_embedding"].shape[1]
        out["text_projection"] = torch.eye(width, dtype=out["positional_embedding"].dtype)
    return out


def text_encoder_state_dict_to_ldm(
    state_dict: Mapping[str, torch.Tensor], layout: TextLayout
) -> dict[str, torch.Tensor]:
    """A CLIP text model state dict with LDM keys relative to the embedder (`transformer.text_model.…` / `model.…`)."""
    if layout == "hf":
        return {f"transformer.text_model.{_hf_relative(key)}": value for key, value in state_dict.items()}
    return {f"model.{key}": value for key, value in _openclip_state_dict(state_dict).items()}


def ldm_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """The whole model as an A1111 single-file state dict (UNet, VAE, text encoders; `v_pred` for v-prediction)."""
    out = {
        UNET_PREFIX + k: v
        for k, v in unet_state_dict_to_ldm(components.unet.state_dict(), components.unet.config).items()
    }
    vae = vae_state_dict_to_ldm(components.vae.state_dict(), len(components.vae.config["up_block_types"]))
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for (prefix, layout), encoder in zip(TEXT_ENCODER_SLOTS[components.kind], components.text_encoders, strict=True):
        out.update({prefix + k: v for k, v in text_encoder_state_dict_to_ldm(encoder.state_dict(), layout).items()})
    if components.prediction == "v":
        out[V_PRED_KEY] = torch.zeros(0)
    return out


def save_single_file(components: Components, path: Path | str) -> Path:
    """Write `components` as an A1111-style .safetensors checkpoint (atomically)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in ldm_state_dict(components).items()}
    return save_safetensors(Path(path), tensors)
