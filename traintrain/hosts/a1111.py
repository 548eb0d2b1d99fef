"""AUTOMATIC1111 WebUI 1.10: jobs train the WebUI's loaded LDM / sgm model in place (`LdmBundle`).

Before: the picked checkpoint / VAE is loaded through the WebUI's own loaders, the Lora extension's merged weights are
restored, lowvram / medvram offloading is suspended, fp8 weights are refused. After: everything is put back
(webui.md §2, §3.1, §3.4). reForge reuses this path (`reforge.py`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.hosts.common import HostModelProvider, checkpoint_info, lora_extension, vae_file
from traintrain.models.bundle import ModelBundle
from traintrain.precision import weight_dtype

FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
LOWVRAM_HOOK = "send_me_to_gpu"  # the forward pre-hook modules/lowvram.py puts on the offloaded modules
LORA_BACKUPS = ("network_weights_backup", "network_bias_backup")  # the Lora extension's copies of merged layers
NOT_LDM_MESSAGE = (
    "TrainTrain trains this WebUI's loaded model in place, which needs an LDM model object (a torch.nn.Module); the "
    "loaded model is a {kind}. Load an SD1, SD2 or SDXL checkpoint, or use TrainTrain standalone: python -m traintrain "
    "ui, with the checkpoint file."
)
FP8_MESSAGE = (
    "The loaded model keeps its weights in fp8 (Settings > Optimizations > FP8 weight), which cannot be trained: set "
    "FP8 weight to Disable, apply, reload the checkpoint, then start the training again."
)


def restore_lora_weights(sd_model: nn.Module) -> None:
    """Undo the Lora extension's in-place merge: clean weights back from its backups, its caches and list cleared."""
    networks = lora_extension()
    if networks is None:
        return
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in sd_model.modules():
            if any(getattr(module, name, None) is not None for name in LORA_BACKUPS):
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)


def refuse_unsupported(sd_model: Any) -> None:
    """Refuse models that cannot be trained in place: objects that are not LDM modules and fp8-stored weights."""
    if not isinstance(sd_model, nn.Module):
        raise TrainTrainError(NOT_LDM_MESSAGE.format(kind=type(sd_model).__name__))
    if any(parameter.dtype in FP8 for parameter in sd_model.parameters()):
        raise TrainTrainError(FP8_MESSAGE)


@contextlib.contextmanager
def lowvram_suspended(sd_model: nn.Module) -> Iterator[None]:
    """Under --lowvram / --medvram: everything back on the CPU and the offloading hooks and VAE wrappers taken off,
    so the bundle can place the model itself; afterwards hooks and wrappers return and nothing counts as on the GPU."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    from modules import lowvram

    lowvram.send_everything_to_cpu()
    hooked = []
    for module in sd_model.modules():
        hooks = module._forward_pre_hooks
        ours = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") == LOWVRAM_HOOK]
        if ours:
            hooked.append((module, dict(hooks)))
            for key in ours:
                del hooks[key]
    vae = sd_model.first_stage_model
    wrappers = {name: vae.__dict__.pop(name) for name in ("encode", "decode") if name in vae.__dict__}
    try:
        yield
    finally:
        vae.__dict__.update(wrappers)
        for module, hooks in hooked:
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
        lowvram.module_in_gpu = None


@contextlib.contextmanager
def checkpoint_loaded(name: str) -> Iterator[Any]:
    """The WebUI's model with checkpoint `name` loaded by the WebUI ('' = as loaded); the previous one comes back."""
    from modules import sd_models, shared

    current = shared.sd_model
    if not name:
        yield current
        return
    info = checkpoint_info(name)
    previous = getattr(current, "sd_checkpoint_info", None)
    if previous is not None and previous.filename == info.filename:
        yield current
        return
    sd_models.reload_model_weights(info=info)
    try:
        yield shared.sd_model
    finally:
        if previous is not None:
            sd_models.reload_model_weights(info=previous)


@contextlib.contextmanager
def vae_loaded(sd_model: Any, name: str) -> Iterator[None]:
    """The WebUI's VAE `name` loaded by the WebUI for the duration ('' = as loaded); the previous one comes back."""
    if not name:
        yield
        return
    from modules import sd_vae

    path = vae_file(name)
    previous = sd_vae.loaded_vae_file
    sd_vae.reload_vae_weights(sd_model, vae_file=path)
    try:
        yield
    finally:
        sd_vae.reload_vae_weights(sd_model, vae_file=previous)


def _model_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The UNet / text-encoder dtype while training: 'model' keeps the WebUI's (fp32 on the CPU)."""
    if config.train_model_precision == "model" and device.type != "cpu":
        return None
    return weight_dtype(config.train_model_precision, device)


class A1111ModelProvider(HostModelProvider):
    """AUTOMATIC1111: the loaded (or picked) model trained in place, everything it changes put back afterwards."""

    @contextlib.contextmanager
    def model_for(self, config: TrainConfig) -> Iterator[ModelBundle]:
        """The bundle over the WebUI's model for `config`, with the host's patches taken off for the job."""
        from modules import devices

        from traintrain.models.ldm_bundle import LdmBundle

        device = torch.device(devices.device)
        vae_dtype = weight_dtype(config.train_VAE_precision, device)
        with checkpoint_loaded(config.model) as sd_model, vae_loaded(sd_model, config.vae):
            refuse_unsupported(sd_model)
            self.release_patches(sd_model)
            with lowvram_suspended(sd_model):
                bundle = LdmBundle(sd_model, device, _model_dtype(config, device), vae_dtype=vae_dtype)
                if config.model_v_pred:
                    bundle.prediction = "v"
                yield bundle

    def release_patches(self, sd_model: nn.Module) -> None:
        """Take what generations applied to the weights off (A1111: the Lora extension's in-place merge)."""
        restore_lora_weights(sd_model)
