"""LoHa with Tucker (CP) factors for k×k convolutions (LyCORIS `use_tucker`): each Hadamard factor is
t ×₁ a ×₂ b with a core t (r, r, k, k), a (r, out) and b (r, in), so the kernel lives in the small core only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from traintrain.networks.modules import AdapterModule

PARTS = ("hada_w1_a", "hada_w1_b", "hada_t1", "hada_w2_a", "hada_w2_b", "hada_t2")


def tucker_weight(core: torch.Tensor, outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """W[o, i, k, l] = Σ core[p, q, k, l] · outputs[p, o] · inputs[q, i] (the WebUI's and LyCORIS' rebuild)."""
    return torch.einsum("p q k l, p o, q i -> o i k l", core, outputs, inputs)


class LoHaTuckerModule(AdapterModule):
    """ΔW = tucker(t1, w1_a, w1_b) ⊙ tucker(t2, w2_a, w2_b) · alpha/rank; w2_a starts at zero, so ΔW does too."""

    kind = "loha_tucker"

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        if not self.is_conv or self.kernel == (1, 1):
            raise TypeError("Tucker factors are for k×k convolutions with k > 1.")
        for index in (1, 2):
            setattr(self, f"hada_t{index}", nn.Parameter(torch.randn(rank, rank, *self.kernel) * 0.1))
            setattr(self, f"hada_w{index}_a", nn.Parameter(torch.randn(rank, self.out_dim) * 0.1))
            setattr(self, f"hada_w{index}_b", nn.Parameter(torch.randn(rank, self.in_dim)))
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        first = tucker_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
        second = tucker_weight(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        return first * second * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.delta_weight() * self.multiplier, **self.conv_args)

    def file_tensors(self, strength: float) -> dict[str, torch.Tensor]:
        """The module's tensors under LyCORIS' names, ΔW scaled by `strength` through w1_a."""
        tensors = {part: getattr(self, part).detach() for part in PARTS}
        tensors["hada_w1_a"] = tensors["hada_w1_a"] * strength
        return tensors

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights saved by `file_tensors` (at strength 1) into this module."""
        for part in PARTS:
            getattr(self, part).data.copy_(tensors[part])
