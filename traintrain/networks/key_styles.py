"""The two kohya naming styles of UNet modules: diffusers paths (`lora_unet_down_blocks_1_attentions_0_…`, what
kohya writes for SD1/SD2 and the original TrainTrain wrote for SDXL too) and compvis / LDM paths
(`lora_unet_input_blocks_4_1_…`, what kohya writes for SDXL). A file in either style is read into the targets of
either style; files are always written in the targets' own style.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from traintrain.models.ldm_convert import _UNET_RESNET

_DIFFUSERS_NAME = re.compile(
    r"^lora_unet_(?:(?P<side>down|up)_blocks_(?P<level>\d+)|mid_block)_"
    r"(?P<kind>resnets|attentions|downsamplers|upsamplers)_(?P<index>\d+)_(?P<rest>.+)$"
)
_RESNET_PARTS = {old.replace(".", "_"): new.replace(".", "_") for old, new in _UNET_RESNET.items()}
LAYERS_PER_BLOCK = (2, 1, 3)  # the layouts tried, SD / SDXL's first


def compvis_name(name: str, layers_per_block: int, upsampler_slot: int) -> str | None:
    """The compvis-style kohya name of a diffusers-style UNet module name (None for any other name).

    `upsampler_slot` is 2 in up blocks with attentions (resnet, attention, upsampler) and 1 without."""
    match = _DIFFUSERS_NAME.match(name)
    if match is None:
        return None
    side, kind, rest = match["side"], match["kind"], match["rest"]
    level, index, per_level = int(match["level"] or 0), int(match["index"]), layers_per_block + 1
    slot = "1" if kind == "attentions" else "0"
    part = next((p for p in _RESNET_PARTS if rest == p or rest.startswith(p + "_")), None)
    if kind == "resnets" and part is not None:
        rest = _RESNET_PARTS[part] + rest[len(part) :]
    if side is None:
        return f"lora_unet_middle_block_{2 * index if kind == 'resnets' else 1}_{rest}"
    if side == "down":
        if kind == "downsamplers":
            return f"lora_unet_input_blocks_{(level + 1) * per_level}_0_op"
        return f"lora_unet_input_blocks_{level * per_level + 1 + index}_{slot}_{rest}"
    if kind == "upsamplers":
        return f"lora_unet_output_blocks_{level * per_level + layers_per_block}_{upsampler_slot}_conv"
    return f"lora_unet_output_blocks_{level * per_level + index}_{slot}_{rest}"


def name_resolver(file_names: Iterable[str], target_names: Iterable[str]) -> Callable[[str], str]:
    """A map from a file's module names to the targets' names: the name itself when the styles agree, else the
    diffusers ↔ compvis translation under the UNet layout that places every one of the file's UNet modules."""
    targets = set(target_names)
    file_names = set(file_names)
    foreign = {n for n in file_names if n not in targets and n.startswith("lora_unet_")}
    if not foreign:
        return lambda name: name
    best: dict[str, str] = {}
    for layers in LAYERS_PER_BLOCK:
        forward = {n: _compvis(n, layers, targets) for n in foreign}  # diffusers file, compvis targets
        backward = {_compvis(t, layers, file_names): t for t in targets}  # compvis file, diffusers targets
        mapping = {n: forward[n] if forward[n] in targets else backward.get(n, n) for n in foreign}
        if sum(v in targets for v in mapping.values()) > sum(v in targets for v in best.values()):
            best = mapping
        if all(v in targets for v in best.values()):
            break
    return lambda name: best.get(name, name)


def _compvis(name: str, layers: int, known: set[str]) -> str | None:
    """`compvis_name` with the upsampler slot that exists among `known` (2 when neither does)."""
    with_attention = compvis_name(name, layers, 2)
    if with_attention is None or with_attention in known or "_upsamplers_" not in name:
        return with_attention
    return compvis_name(name, layers, 1)
