"""DoRA (weight-decomposed LoRA) in the WebUI's layout: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm taken per input
channel (over outputs and kernel), the magnitude `dora_scale` shaped (1, in) or (1, in, 1, 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from traintrain.networks.modules import LoRAModule


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input channel, shaped (1, in, 1, …) to broadcast over W."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1).view(1, -1, *([1] * (weight.dim() - 2)))


class DoRAModule(LoRAModule):
    """A LoRA whose merged weight is renormalised per input channel to a trained magnitude (initially ‖W‖), so it
    starts as the base layer. The base weight is read (never trained) at every step."""

    kind = "dora"

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        self._base = [base]  # a list: the base layer is not a submodule (not saved, not moved, not trained)
        self.dora_scale = nn.Parameter(column_norm(base.weight.detach().float()).clone())

    def merged_weight(self) -> torch.Tensor:
        """W' = m · (W + ΔW) / ‖W + ΔW‖ in the adapter's dtype."""
        base = self._base[0].weight.detach().to(self.dora_scale.dtype)
        merged = base + super().delta_weight()
        return merged * (self.dora_scale / column_norm(merged))

    def delta_weight(self) -> torch.Tensor:
        """W' − W: what the WebUI adds to the layer at weight 1."""
        return self.merged_weight() - self._base[0].weight.detach().to(self.dora_scale.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight() * self.multiplier
        return F.conv2d(x, weight, **self.conv_args) if self.is_conv else F.linear(x, weight)

    def file_tensors(self, strength: float) -> dict[str, torch.Tensor]:
        """lora_down / lora_up (ΔW scaled by `strength` through lora_up) and the magnitude `dora_scale`."""
        return {
            "lora_down.weight": self.lora_down.weight.detach(),
            "lora_up.weight": self.lora_up.weight.detach() * strength,
            "dora_scale": self.dora_scale.detach(),
        }

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights saved by `file_tensors` (at strength 1) into this module."""
        self.lora_down.weight.data.copy_(tensors["lora_down.weight"])
        self.lora_up.weight.data.copy_(tensors["lora_up.weight"])
        self.dora_scale.data.copy_(tensors["dora_scale"].reshape(self.dora_scale.shape))

    @staticmethod
    def file_rank(tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a saved module (rows of lora_down)."""
        return int(tensors["lora_down.weight"].shape[0])
