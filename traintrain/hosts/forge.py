"""Forge (main) and Forge Neo: jobs train a copy loaded from the checkpoint file; Forge's own model is left alone.

Forge's model is a `ForgeDiffusionEngine` (not an nn.Module) whose weights are inference tensors, with LoRAs merged
into them (forge.md §2). So, under Forge's generation lock: Forge frees its device copy (`unload_all_models`, which
also takes merged LoRAs off), the picked or loaded checkpoint file is loaded with the project's own offline loader
onto Forge's device, trained, and dropped from the device again. Two copies are never on the device at once; Forge
loads its (unchanged) model back for its next generation by itself. Holding the lock also keeps Forge from loading
a model meanwhile, whose build swaps `torch.nn.Linear` & co. process-wide for its own classes (forge.md §2.5).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from traintrain.config import TrainConfig
from traintrain.hosts.common import HostModelProvider
from traintrain.hosts.forge_files import training_files
from traintrain.models.bundle import ModelBundle
from traintrain.precision import weight_dtype

TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def free_host_model() -> None:
    """Let Forge move its models off the device (their LoRA patches come off) and empty its cache (forge.md §2.4)."""
    from backend import memory_management

    memory_management.unload_all_models()
    memory_management.soft_empty_cache()


def empty_device_cache() -> None:
    """Give the device memory our copy used back to Forge."""
    from backend import memory_management

    memory_management.soft_empty_cache()


def model_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The UNet / text-encoder dtype while training: 'model' takes Forge's UNet dtype on a GPU (fp32 on the CPU)."""
    if config.train_model_precision == "model" and device.type != "cpu":
        from modules import devices

        host = getattr(devices, "dtype_unet", torch.float16)
        return host if host in TRAINABLE_DTYPES else torch.float16
    return weight_dtype(config.train_model_precision, device)


def drop_from_device(modules: list[nn.Module]) -> None:
    """Free the device memory of `modules` now, whoever still refers to them (their tensors go to the meta device)."""
    for module in modules:
        module.to(device="meta")


class ForgeModelProvider(HostModelProvider):
    """Forge / Forge Neo: a trainable copy from the checkpoint file while Forge's own model waits off the device."""

    @contextlib.contextmanager
    def model_for(self, config: TrainConfig) -> Iterator[ModelBundle]:
        """The bundle over the checkpoint file for `config` on Forge's device; afterwards it is gone from the device."""
        from backend import memory_management

        from traintrain.models.checkpoint import load_checkpoint
        from traintrain.models.diffusers_backend import DiffusersBundle

        files = training_files(config)
        device = torch.device(memory_management.get_torch_device())
        dtype = model_dtype(config, device)
        free_host_model()
        components = None
        try:
            components = load_checkpoint(
                files.checkpoint,
                config_dir=files.config_dir,
                vae_path=files.vae,
                v_pred=True if config.model_v_pred else None,
                dtype=dtype,
            )
            vae_dtype = weight_dtype(config.train_VAE_precision, device)
            yield DiffusersBundle(components, device=device, dtype=dtype, vae_dtype=vae_dtype)
        finally:
            if components is not None:
                drop_from_device([components.unet, components.vae, *components.text_encoders])
            empty_device_cache()
