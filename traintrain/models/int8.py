"""The `int8` model precision: the UNet's Linear weights stored as int8 with a per-channel scale (torchao's
weight-only quantization), computed in fp16 on a GPU / fp32 on the CPU; the LoRA trains on top as on any UNet.

torchao is optional (it needs a newer torch than the WebUI's own 2.1): without it `int8` is refused with a message.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelBundle

INT8 = "int8"
NEEDS_TORCHAO = (
    "'train model precision' int8 needs the torchao package (pip install torchao; it needs torch 2.6 or newer): "
    "install it or choose fp16 / bf16."
)


def torchao_available() -> bool:
    """Whether torchao can be imported."""
    return importlib.util.find_spec("torchao") is not None


def quantize_int8(unet: nn.Module) -> None:
    """Replace the weights of every Linear layer of `unet` by int8 weight-only tensors (in place)."""
    if not torchao_available():
        raise TrainTrainError(NEEDS_TORCHAO)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as error:  # an installed torchao too old or too new for this torch
        raise TrainTrainError(f"{NEEDS_TORCHAO} (torchao could not be loaded: {error})") from error
    for param in unet.parameters():
        param.requires_grad_(False)
    quantize_(unet, Int8WeightOnlyConfig())


def is_int8(bundle: ModelBundle) -> bool:
    """Whether the bundle's UNet Linear layers hold quantized (non-plain) weights."""
    return any(
        isinstance(t.module, nn.Linear) and type(t.module.weight) not in (nn.Parameter,)
        for t in bundle.lora_targets()
        if t.name.startswith("lora_unet_")
    )


def require_int8(bundle: ModelBundle) -> None:
    """Refuse an int8 training on a model that was not loaded as int8 (a host's own model in the WebUI)."""
    if not is_int8(bundle):
        raise TrainTrainError(
            "'train model precision' int8 works where TrainTrain loads the model itself (standalone UI / CLI); the "
            "WebUI's loaded model stays in its own precision: choose fp16 or bf16 there."
        )
