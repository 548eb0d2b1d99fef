"""LoRA target discovery on diffusers UNets and transformers CLIP text encoders, with kohya names and WebUI blocks."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from torch import nn

from traintrain.models.bundle import (
    ROLE_CROSS_ATTN,
    ROLE_RESNET,
    ROLE_SELF_ATTN,
    ROLE_TEXT,
    ROLE_TRANSFORMER,
    LoraTarget,
    ModelKind,
)
from traintrain.models.ldm_convert import unet_ldm_namer

TEXT_BLOCK = "BASE"
MIDDLE_BLOCK = "M00"
# down_blocks.1.attentions.0.<rest> / up_blocks.2.upsamplers.0.conv / mid_block.resnets.1.conv1
_UNET_LAYER = re.compile(
    r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\."
)
# The layers of CLIPAttention and CLIPMLP, wherever the encoder sits (transformers 5 drops `text_model.`).
_TEXT_LAYER = re.compile(r"(?:^|\.)(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))$")


def unet_block_of(module_name: str, layers_per_block: int) -> str | None:
    """The WebUI block (IN01…, M00, OUT00…) of a diffusers UNet module, None outside the down / mid / up blocks."""
    match = _UNET_LAYER.match(module_name + ".")
    if match is None:
        return None
    side, level, kind, index = match.groups()
    if side is None:
        return MIDDLE_BLOCK
    per_level = layers_per_block + 1  # LDM: L layers + a downsampler going down, L + 1 layers coming up
    level_start = int(level) * per_level
    if side == "down":
        number = level_start + per_level if kind == "downsamplers" else level_start + 1 + int(index)
        return f"IN{number:02d}"
    number = level_start + layers_per_block if kind == "upsamplers" else level_start + int(index)
    return f"OUT{number:02d}"


def _unet_role(module_name: str) -> str:
    """Role of a UNet Linear / Conv2d inside the down / mid / up blocks: attention part, other transformer, resnet."""
    if ".attentions." not in module_name:
        return ROLE_RESNET  # resnets (conv1, conv2, time_emb_proj, conv_shortcut) and down / up sampler convs
    if ".attn1." in module_name:
        return ROLE_SELF_ATTN
    if ".attn2." in module_name:
        return ROLE_CROSS_ATTN
    return ROLE_TRANSFORMER  # proj_in, proj_out, ff.net.0.proj, ff.net.2


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def unet_kohya_paths(kind: ModelKind, config: Mapping[str, Any]) -> Callable[[str], str] | None:
    """What kohya builds a UNet target's name from: SDXL the LDM path (`input_blocks.4.1.…`, kohya's compvis-style
    names, which the WebUI, Forge, ComfyUI and diffusers map directly; the WebUI's diffusers → compvis rules assume
    SD1's layout and drop SDXL's first upsampler); SD1 / SD2 the diffusers path (None), which the WebUI maps right."""
    return unet_ldm_namer(config) if kind == "sdxl" else None


def collect_targets(
    unet: nn.Module,
    text_encoders: list[tuple[str, nn.Module]],
    layers_per_block: int,
    kohya_path: Callable[[str], str] | None = None,
) -> list[LoraTarget]:
    """Every Linear / Conv2d a network may wrap: UNet transformer and resnet layers, then text-encoder layers.

    `unet` lists its modules under diffusers names (blocks and roles come from them); `kohya_path` (from
    `unet_kohya_paths`) gives the path a UNet target's kohya name is built from, default the diffusers name."""
    targets: list[LoraTarget] = []
    for name, module in unet.named_modules():
        block = unet_block_of(name, layers_per_block) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
        if block is not None:
            path = kohya_path(name) if kohya_path is not None else name
            targets.append(LoraTarget(_kohya("lora_unet", path), module, block, _unet_role(name)))
    for prefix, encoder in text_encoders:
        for name, module in encoder.named_modules():
            match = _TEXT_LAYER.search(name)
            if match is not None and isinstance(module, nn.Linear):
                targets.append(
                    LoraTarget(_kohya(prefix, "text_model." + match.group(1)), module, TEXT_BLOCK, ROLE_TEXT)
                )
    return targets
