"""The ModelBundle over diffusers / transformers modules: tiny models, single-file checkpoints and diffusers folders."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTokenizer

from traintrain.devices import ConstantCache, host_tensor_on, host_values_on
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import Conditioning, LoraTarget, ModelKind, Prediction, frozen, placement
from traintrain.models.targets import collect_targets, unet_kohya_paths
from traintrain.models.tokenizer import chunked_token_ids


@dataclass
class Components:
    """The loaded modules of one Stable Diffusion model and what the trainer must know about them."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]  # [CLIPTextModel] for sd1/sd2, [CLIPTextModel, CLIPTextModelWithProjection] for sdxl
    tokenizers: list[CLIPTokenizer]  # one per text encoder
    kind: ModelKind
    prediction: Prediction
    alphas_cumprod: torch.Tensor  # (1000,) float32


def ddpm_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Cumulative alphas of SD's "scaled_linear" DDPM schedule, computed in float64 like LDM, returned as float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def uniform_layers_per_block(unet: UNet2DConditionModel) -> int:
    """The UNet's layers per block (one number: SD1, SD2 and SDXL use the same count at every level)."""
    layers = unet.config.layers_per_block
    counts = {layers} if isinstance(layers, int) else set(layers)
    if len(counts) != 1:
        raise TrainTrainError(f"UNets with a different layer count per level ({layers}) are not supported.")
    return counts.pop()


def _final_layer_norm(encoder: nn.Module) -> nn.Module:
    """The final LayerNorm of a CLIP text encoder (transformers 5 drops CLIPTextModel's `text_model` level)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


class DiffusersBundle:
    """A ModelBundle over diffusers components; owns them and keeps them on `device` (UNet / text encoders in `dtype`)."""

    def __init__(
        self,
        components: Components,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        clip_skip: int = 1,
    ) -> None:
        if len(components.text_encoders) != len(components.tokenizers):
            raise ValueError("Components need one tokenizer per text encoder.")
        self.components = components
        self.kind: ModelKind = components.kind
        self.prediction: Prediction = components.prediction
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.clip_skip = clip_skip
        self.alphas_cumprod = components.alphas_cumprod.to(self.device, torch.float32)
        self._checkpointing = False
        self._in_training = False
        self._constants = ConstantCache()
        self._place()

    def _place(self) -> None:
        """UNet and text encoders to device / dtype, VAE to device / vae_dtype."""
        for module in (self.components.unet, *self.components.text_encoders):
            module.to(device=self.device, dtype=self.dtype)
        self.components.vae.to(device=self.device, dtype=self.vae_dtype)

    @property
    def _vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.components.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder (`ids_0`, `ids_1`), (B, chunks, 77) in 75-token chunks, on the bundle device."""
        return {
            f"ids_{index}": host_tensor_on(self.device, chunked_token_ids(tokenizer, prompts))
            for index, tokenizer in enumerate(self.components.tokenizers)
        }

    def encode_text(self, prompts: list[str]) -> Conditioning:
        """SD1: last layer (or `clip_skip` layers back, final norm); SD2: the last layer of the 23-layer converted
        encoder (OpenCLIP's penultimate) with the final norm; SDXL: penultimate of both + TE2's pooled (first chunk)."""
        return self.encode_tokens(self.tokenize(prompts))

    def encode_tokens(self, tokens: Mapping[str, torch.Tensor]) -> Conditioning:
        """`encode_text` from `tokenize`'s ids: every chunk encoded separately, the chunks concatenated."""
        contexts, pooled = [], None
        for index, encoder in enumerate(self.components.text_encoders):
            ids = tokens[f"ids_{index}"]
            output = encoder(ids.flatten(0, 1), output_hidden_states=True)
            contexts.append(self._layer(encoder, output).unflatten(0, ids.shape[:2]).flatten(1, 2))
            if index == 1:
                pooled = output.text_embeds.unflatten(0, ids.shape[:2])[:, 0]
        return Conditioning(torch.cat(contexts, dim=-1), pooled)

    def _layer(self, encoder: nn.Module, output: Any) -> torch.Tensor:
        """The hidden state the UNet is conditioned on (see `encode_text`)."""
        if self.kind == "sdxl":
            return output.hidden_states[-2]
        if self.kind == "sd1" and self.clip_skip > 1:
            return _final_layer_norm(encoder)(output.hidden_states[-self.clip_skip])
        return output.last_hidden_state

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] → sampled latents times the VAE scaling factor, float32."""
        vae = self.components.vae
        latents = vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist.sample()
        return (latents * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels clamped to [-1,1], float32."""
        vae = self.components.vae
        pixels = vae.decode(latents.to(self.device, self.vae_dtype) / vae.config.scaling_factor).sample
        return pixels.float().clamp(-1.0, 1.0)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output in the bundle dtype; SDXL gets its pooled text and the time ids `sizes` (default: the latents'
        pixel size, uncropped: [h, w, 0, 0, h, w])."""
        noisy = noisy_latents.to(self.device, self.dtype)
        added = None
        if self.kind == "sdxl":
            if cond.pooled is None:
                raise ValueError("SDXL conditioning needs the pooled text embedding.")
            height, width = (size * self._vae_scale for size in noisy.shape[-2:])
            time_ids = self._constants.get(
                ("time_ids", height, width, len(noisy), self.device, self.dtype),
                lambda: host_values_on(self.device, [[height, width, 0, 0, height, width]] * len(noisy), self.dtype),
            ) if sizes is None else sizes.to(self.device, self.dtype)
            added = {"text_embeds": cond.pooled.to(self.device, self.dtype), "time_ids": time_ids}
        context = cond.context.to(self.device, self.dtype)
        return self.components.unet(noisy, timesteps.to(self.device), context, added_cond_kwargs=added).sample

    def lora_targets(self) -> list[LoraTarget]:
        """UNet and text-encoder layers by kohya name (lora_te for SD1/SD2, lora_te1 / lora_te2 for SDXL; SDXL's UNet
        compvis-style, SD1/SD2's diffusers-style, as kohya names them)."""
        encoders = self.components.text_encoders
        prefixes = ["lora_te"] if len(encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(encoders))]
        unet = self.components.unet
        paths = unet_kohya_paths(self.kind, unet.config)
        return collect_targets(unet, list(zip(prefixes, encoders)), uniform_layers_per_block(unet), paths)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Gradient checkpointing of the UNet (text encoders see 77 tokens: their activations are small)."""
        unet = self.components.unet
        if enabled:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        self._checkpointing = enabled
        if self._in_training:
            unet.train(enabled)  # diffusers checkpoints only in train mode; SD's dropout rates are 0

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Place and freeze every module, eval mode; afterwards restore device, dtype, requires_grad, mode, checkpointing."""
        parts = self.components
        modules = [parts.unet, *parts.text_encoders, parts.vae]
        placements = [(module, *placement(module)) for module in modules]
        checkpointing = self._checkpointing
        try:
            self._place()
            with frozen(modules):
                for module in modules:
                    module.eval()
                self._in_training = True
                parts.unet.train(self._checkpointing)
                yield
        finally:
            self._in_training = False
            self.set_gradient_checkpointing(checkpointing)
            for module, device, dtype in placements:
                module.to(device=device, dtype=dtype)
