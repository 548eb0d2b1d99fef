"""The ModelBundle interface: everything a training mode may ask of a model, whatever adapter provides it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

ModelKind = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["epsilon", "v"]

# kohya's `ss_base_model_version` per model kind.
BASE_MODEL_VERSION: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}

# Roles of a LoRA target module (used by the network's element / type filters).
ROLE_SELF_ATTN = "attn1"  # self-attention projections inside a transformer block
ROLE_CROSS_ATTN = "attn2"  # cross-attention projections inside a transformer block
ROLE_TRANSFORMER = "transformer"  # other linears / 1x1 convs of a transformer (ff, proj_in, proj_out)
ROLE_RESNET = "resnet"  # resnet convs, time_emb_proj, shortcut, down/up-sampler convs (C3Lier / LoHa only)
ROLE_TEXT = "te"  # text-encoder attention / MLP linears


@dataclass
class Conditioning:
    """Text conditioning for the UNet: cross-attention context, plus SDXL's pooled text embedding."""

    context: torch.Tensor  # (B, tokens, dim)
    pooled: torch.Tensor | None = None  # (B, dim) for SDXL, else None

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, index: torch.Tensor | slice | list[int]) -> "Conditioning":
        """The rows `index` of this batch."""
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditioning(self.context[index], pooled)

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated so a batch of 1 becomes a batch of n (rows of a larger batch are tiled)."""
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Conditioning(self.context.repeat(n, 1, 1), pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """Moved (and cast, when dtype is given)."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), pooled)

    def detach(self) -> "Conditioning":
        """Cut from the autograd graph."""
        pooled = None if self.pooled is None else self.pooled.detach()
        return Conditioning(self.context.detach(), pooled)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """As named step inputs: `<prefix>_context`, and `<prefix>_pooled` when there is one."""
        named = {f"{prefix}_context": self.context}
        if self.pooled is not None:
            named[f"{prefix}_pooled"] = self.pooled
        return named

    @staticmethod
    def from_tensors(tensors: Mapping[str, torch.Tensor], prefix: str) -> "Conditioning":
        """The conditioning `tensors(prefix)` named."""
        return Conditioning(tensors[f"{prefix}_context"], tensors.get(f"{prefix}_pooled"))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch dimension."""
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])  # type: ignore[misc]
        return Conditioning(torch.cat([c.context for c in items]), pooled)


@dataclass
class LoraTarget:
    """One module a network may wrap, with its kohya name, UI block (BASE, IN00…, M00, OUT00…) and role."""

    name: str  # e.g. lora_unet_down_blocks_0_attentions_0_proj_in (SDXL: lora_unet_input_blocks_4_1_proj_in),
    # lora_te_text_model_encoder_layers_0_mlp_fc1
    module: nn.Module  # nn.Linear or nn.Conv2d
    block: str
    role: str


@runtime_checkable
class ModelBundle(Protocol):
    """What every training mode relies on. Adapters: diffusers (standalone, tiny) and the WebUI's loaded model."""

    kind: ModelKind
    prediction: Prediction
    alphas_cumprod: torch.Tensor  # (1000,) float32, on `device`
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights during training
    vae_dtype: torch.dtype  # dtype the VAE encodes / decodes in (set per run from `train VAE precision`)
    clip_skip: int  # SD1: condition on the N-th layer from the last (1 = last); the host's setting by default

    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Encode captions. Gradients flow through text-encoder LoRA modules when the caller enables grad."""
        ...

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The host half of `encode_text`: named token tensors (ids per text encoder, ...), batch first, on the
        device; prompts are cut in 75-token chunks (each encoded separately, concatenated), as the WebUI does."""
        ...

    def encode_tokens(self, tokens: Mapping[str, torch.Tensor]) -> Conditioning:
        """The device half of `encode_text`: `encode_tokens(tokenize(prompts))` is `encode_text(prompts)`."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] → scaled latents (B,4,H/8,W/8), float32."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in [-1,1] (for previews)."""
        ...

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output for noisy latents at integer timesteps. SDXL's size conditioning: `sizes` (B,6) = original
        height / width, crop top / left, target height / width in pixels; None: an uncropped image of the latents'
        size. Other models ignore it."""
        ...

    def lora_targets(self) -> list[LoraTarget]:
        """Every module a network may wrap, in a stable order, named as kohya names them."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn gradient checkpointing of the UNet (and text encoders) on or off."""
        ...

    def training(self) -> contextlib.AbstractContextManager[None]:
        """Prepare the model for training (device, frozen weights) and restore it afterwards, error or not."""
        ...


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first floating-point parameter."""
    parameter = next(p for p in module.parameters() if p.is_floating_point())
    return parameter.device, parameter.dtype


@contextlib.contextmanager
def frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Freeze the parameters of `modules` for the duration, restoring each `requires_grad` and train/eval flag."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
