"""A trainable network: adapter modules chosen by type / element / block rules, hooked onto the model's layers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from traintrain.config_fields import ELEMENTS, NETWORK_TYPES
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import (
    ROLE_CROSS_ATTN,
    ROLE_RESNET,
    ROLE_SELF_ATTN,
    ROLE_TEXT,
    ROLE_TRANSFORMER,
    LoraTarget,
)
from traintrain.models.targets import TEXT_BLOCK
from traintrain.networks.adapters import ADAPTER_KINDS, KIND_OF_NETWORK_TYPE
from traintrain.networks.loha_tucker import LoHaTuckerModule
from traintrain.networks.modules import AdapterModule, LoHaModule



@dataclass
class NetworkSpec:
    """What to train: network type, ranks, alphas, element and blocks (BASE = the text encoders)."""

    network_type: str = "lierla"
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0  # 0 = rank
    conv_alpha: float = 0.0  # 0 = alpha
    element: str = "Full"
    blocks: list[str] | None = None  # None = every block; [] = none (only BASE ticked in a UNet-only mode)
    tucker: bool = False  # loha: k×k convs get Tucker factors

    def check(self) -> None:
        """Refuse combinations that cannot be built, with a message saying what to change."""
        if self.network_type not in NETWORK_TYPES:
            raise TrainTrainError(f"Unknown network type {self.network_type!r}: choose one of {', '.join(NETWORK_TYPES)}.")
        if self.element not in ELEMENTS:
            raise TrainTrainError(f"Unknown network element {self.element!r}: choose one of {', '.join(ELEMENTS)}.")
        if self.network_type == "loha" and self.element != "Full":
            raise TrainTrainError("Network element CrossAttention / SelfAttention is not available with loha: use Full.")
        if self.rank < 1 or self.conv_rank < 0:
            raise TrainTrainError("Network rank must be at least 1 (conv rank at least 0, 0 = network rank).")
        if self.alpha <= 0 or self.conv_alpha < 0:
            raise TrainTrainError("Network alpha must be above 0 (conv alpha 0 = network alpha).")

    def accepts(self, target: LoraTarget) -> bool:
        """Whether this spec trains the target module."""
        if self.blocks is not None and target.block not in self.blocks:
            return False
        if self.element == "CrossAttention":
            return target.role == ROLE_CROSS_ATTN
        if self.element == "SelfAttention":
            return target.role == ROLE_SELF_ATTN
        if target.role == ROLE_RESNET:
            return self.network_type in ("c3lier", "loha", "lokr", "dora")
        if target.role in (ROLE_SELF_ATTN, ROLE_CROSS_ATTN, ROLE_TRANSFORMER, ROLE_TEXT):
            return self.network_type != "lierla" or _is_pointwise(target.module)
        return False

    def rank_alpha_for(self, module: nn.Module) -> tuple[int, float]:
        """Rank and alpha of the adapter for `module`: conv rank/alpha for k×k convs with k > 1."""
        if _is_pointwise(module):
            return self.rank, self.alpha
        return self.conv_rank or self.rank, self.conv_alpha or self.alpha


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1))


class Network(nn.Module):
    """Adapter modules by kohya name, installed on their layers with forward hooks (removable, weights untouched)."""

    def __init__(
        self,
        spec: NetworkSpec,
        adapters: dict[str, AdapterModule],
        layers: dict[str, nn.Module],
        blocks: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.adapters = nn.ModuleDict(adapters)
        self._layers = layers
        self.blocks = blocks or {}  # adapter name -> block (BASE, IN00 …), for per-block learning rates
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def build(cls, spec: NetworkSpec, targets: list[LoraTarget], only: set[str] | None = None) -> "Network":
        """Create an adapter for every accepted target (or, with `only`, for exactly those names)."""
        spec.check()
        adapter_cls = ADAPTER_KINDS[KIND_OF_NETWORK_TYPE[spec.network_type]]
        adapters: dict[str, AdapterModule] = {}
        layers: dict[str, nn.Module] = {}
        blocks = {target.name: target.block for target in targets}
        for target in targets:
            if (only is not None and target.name not in only) or (only is None and not spec.accepts(target)):
                continue
            rank, alpha = spec.rank_alpha_for(target.module)
            tucker = spec.tucker and adapter_cls is LoHaModule and not _is_pointwise(target.module)
            adapters[target.name] = (LoHaTuckerModule if tucker else adapter_cls)(target.module, rank, alpha)
            layers[target.name] = target.module
        if not adapters:
            raise TrainTrainError(
                "No layer matches the chosen network blocks / element: tick more blocks (BASE, the text encoder, is "
                "trained in LoRA mode only) or use network element Full."
            )
        return cls(spec, adapters, layers, {name: blocks[name] for name in adapters})

    @property
    def text_encoder_names(self) -> list[str]:
        """Names of the adapters on text-encoder layers."""
        return [n for n in self.adapters if n.startswith("lora_te")]

    def to_device(self, device: torch.device, dtype: torch.dtype) -> "Network":
        """Move the adapters to the model's device, with their own (training) dtype."""
        return self.to(device=device, dtype=dtype)

    def set_multiplier(self, value: float) -> None:
        """Strength of every adapter (0 = the base model, 1 = trained strength)."""
        for adapter in self.adapters.values():
            adapter.multiplier = value

    @contextlib.contextmanager
    def multiplier(self, value: float) -> Iterator[None]:
        """Temporarily set the strength of every adapter."""
        previous = next(iter(self.adapters.values())).multiplier
        self.set_multiplier(value)
        try:
            yield
        finally:
            self.set_multiplier(previous)

    @contextlib.contextmanager
    def applied(self) -> Iterator["Network"]:
        """Hook the adapters onto their layers; the hooks are removed on exit, error or not."""
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def install(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_hook(_make_hook(self.adapters[name])))

    def remove(self) -> None:
        """Remove the forward hooks: the model computes exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def param_groups(
        self, lr: float, text_encoder_lr: float | None = None, block_weights: dict[str, float] | None = None
    ) -> list[dict]:
        """Optimizer groups: text-encoder adapters (own lr when given), then UNet adapters; with `block_weights`, one
        group per block instead, its lr multiplied by the block's weight (1 when not named)."""
        if block_weights:
            return self._block_groups(lr, text_encoder_lr or lr, block_weights)
        te = [p for n, a in self.adapters.items() if n.startswith("lora_te") for p in a.parameters()]
        unet = [p for n, a in self.adapters.items() if not n.startswith("lora_te") for p in a.parameters()]
        groups = []
        if te:
            groups.append({"params": te, "lr": text_encoder_lr or lr, "name": "text_encoder"})
        if unet:
            groups.append({"params": unet, "lr": lr, "name": "unet"})
        return groups

    def _block_groups(self, lr: float, text_encoder_lr: float, weights: dict[str, float]) -> list[dict]:
        """One optimizer group per block, in the order blocks first appear."""
        by_block: dict[str, list[nn.Parameter]] = {}
        for name, adapter in self.adapters.items():
            block = self.blocks.get(name, TEXT_BLOCK if name.startswith("lora_te") else "")
            by_block.setdefault(block, []).extend(adapter.parameters())
        return [
            {"params": params, "lr": (text_encoder_lr if block == TEXT_BLOCK else lr) * weights.get(block, 1.0),
             "name": block or "unet"}
            for block, params in by_block.items()
        ]  # fmt: skip


def _make_hook(adapter: AdapterModule):
    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if adapter.multiplier == 0.0:
            return output
        x = inputs[0]
        if not (x.is_cuda and torch.is_autocast_enabled()):  # CUDA autocast casts x for the adapter's matmuls itself
            x = x.to(adapter.weight_dtype)
        return output + adapter.delta(x).to(output.dtype)

    return hook
