"""Adapter modules that add a trained low-rank delta to one Linear / Conv2d: LoRA (LierLa, C3Lier) and LoHa (LoKr and
DoRA live in their own modules; `adapters.py` lists them all)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def _layer_shape(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(in features/channels, out features/channels, kernel size) of a Linear or Conv2d."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels, tuple(base.kernel_size)
    raise TypeError(f"Only Linear and Conv2d layers can be adapted, not {type(base).__name__}.")


class AdapterModule(nn.Module):
    """Common part: the wrapped layer's geometry, alpha/rank scaling and a runtime multiplier."""

    kind: str = ""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.kernel = _layer_shape(base)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            if base.groups != 1:
                raise TypeError("Grouped convolutions are not adapted.")
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        self._weight_dtype: torch.dtype | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the trained weights, cached for the forward hook (a move or cast through `_apply` clears it)."""
        if self._weight_dtype is None:
            self._weight_dtype = next(self.parameters()).dtype
        return self._weight_dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> AdapterModule:
        """Every `.to()` / `.half()` / `.cuda()` comes here: forget the cached dtype."""
        self._weight_dtype = None
        return super()._apply(fn, *args, **kwargs)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the wrapped layer's output for input x."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the wrapped layer's weight shape, scale included, multiplier excluded."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.kind}, rank={self.rank}, alpha={float(self.alpha)}, in={self.in_dim}, out={self.out_dim}"


class LoRAModule(AdapterModule):
    """kohya LoRA: out += up(down(x)) · alpha/rank; a 3×3 conv gets a 3×3 down and a 1×1 up (LoCon)."""

    kind = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        if self.is_conv:
            self.lora_down = nn.Conv2d(self.in_dim, rank, self.kernel, bias=False, **self.conv_args)
            self.lora_up = nn.Conv2d(rank, self.out_dim, 1, bias=False)
        else:
            self.lora_down = nn.Linear(self.in_dim, rank, bias=False)
            self.lora_up = nn.Linear(rank, self.out_dim, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.scale * self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        down = self.lora_down.weight.flatten(1)  # (r, in·k·k)
        up = self.lora_up.weight.flatten(1)  # (out, r)
        weight = (up @ down) * self.scale
        return weight.view(self.out_dim, self.in_dim, *self.kernel) if self.is_conv else weight


class LoHaModule(AdapterModule):
    """LyCORIS LoHa: ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/rank, applied as a layer of its own."""

    kind = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        fan_in = self.in_dim * math.prod(self.kernel)
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_dim, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, fan_in))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, fan_in))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def delta_weight(self) -> torch.Tensor:
        weight = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale
        return weight.view(self.out_dim, self.in_dim, *self.kernel) if self.is_conv else weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight() * self.multiplier
        if self.is_conv:
            return F.conv2d(x, weight, **self.conv_args)
        return F.linear(x, weight)

