"""reForge: an A1111-like `LatentDiffusion` over ldm_patched, trained in place as on AUTOMATIC1111 (`a1111.py`).

Two differences (forge.md §2.6, §4.2, §8): LoRAs are patched into the weights by ldm_patched's ModelPatchers, so the
models are unloaded first (which restores the backed-up weights); and weights moved or patched during a generation
are inference tensors, which autograd cannot save for backward: they are replaced by equal ordinary tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from traintrain.hosts.a1111 import A1111ModelProvider, restore_lora_weights


def replace_inference_tensors(model: nn.Module) -> int:
    """Replace every inference-mode parameter / buffer of `model` by an equal ordinary tensor, one module at a time
    (so at most one module's weights exist twice); returns how many were replaced. Values stay bit-identical."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or not tensor.is_inference():
                        continue
                    copy = tensor.clone()
                    store[name] = nn.Parameter(copy, requires_grad=False) if isinstance(tensor, nn.Parameter) else copy
                    replaced += 1
    return replaced


class ReForgeModelProvider(A1111ModelProvider):
    """reForge: the A1111 in-place path after ldm_patched has unloaded its models and patches."""

    def release_patches(self, sd_model: nn.Module) -> None:
        """Unload ldm_patched's models (their LoRA patches come off), then make the weights trainable tensors."""
        from ldm_patched.modules import model_management

        model_management.unload_all_models()
        model_management.soft_empty_cache()
        restore_lora_weights(sd_model)
        replace_inference_tensors(sd_model)
