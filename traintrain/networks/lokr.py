"""LyCORIS LoKr: ΔW = kron(w1, w2_a·w2_b) · alpha/rank, w1 a small full factor, w2 a low-rank large one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from traintrain.networks.modules import AdapterModule, _layer_shape


def factorize(dimension: int) -> tuple[int, int]:
    """`dimension` = small · large with small ≤ large and small as near √dimension as possible (1·n for primes)."""
    small = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return small, dimension // small


class LoKrModule(AdapterModule):
    """Keys `lokr_w1` (out₁, in₁), `lokr_w2_a` (out₂, r), `lokr_w2_b` (r, in₂·k·k) and `alpha`; the WebUI's rule
    scales by alpha / r with r = rows of `lokr_w2_b`. w1 starts at zero, so ΔW starts at zero."""

    kind = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        in_dim, out_dim, kernel = _layer_shape(base)
        (out_small, out_large), (in_small, in_large) = factorize(out_dim), factorize(in_dim)
        fan_in = in_large * math.prod(kernel)
        super().__init__(base, min(rank, out_large, fan_in), alpha)
        self.lokr_w1 = nn.Parameter(torch.zeros(out_small, in_small))
        self.lokr_w2_a = nn.Parameter(torch.empty(out_large, self.rank))
        self.lokr_w2_b = nn.Parameter(torch.empty(self.rank, fan_in))
        nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        weight = torch.kron(self.lokr_w1, self.lokr_w2_a @ self.lokr_w2_b) * self.scale
        return weight.reshape(self.out_dim, self.in_dim, *self.kernel) if self.is_conv else weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight() * self.multiplier
        return F.conv2d(x, weight, **self.conv_args) if self.is_conv else F.linear(x, weight)

    def file_tensors(self, strength: float) -> dict[str, torch.Tensor]:
        """The file's tensors of this module (without its name prefix), ΔW scaled by `strength` through w1."""
        return {
            "lokr_w1": self.lokr_w1.detach() * strength,
            "lokr_w2_a": self.lokr_w2_a.detach(),
            "lokr_w2_b": self.lokr_w2_b.detach(),
        }

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy weights saved by `file_tensors` (at strength 1) into this module."""
        for key in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"):
            param = getattr(self, key)
            param.data.copy_(tensors[key].reshape(param.shape))

    @staticmethod
    def file_rank(tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a saved module (rows of lokr_w2_b)."""
        return int(tensors["lokr_w2_b"].shape[0])
