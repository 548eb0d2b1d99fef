"""The ModelBundle over the WebUI's loaded LDM / sgm model object (SD1, SD2, SDXL), trained in place and restored.

Pure torch: it reads the model object's attributes (`model.diffusion_model`, `cond_stage_model` / `conditioner`,
`first_stage_model`, `alphas_cumprod`, `parameterization`, `scale_factor`) and never imports the WebUI.
Predictions call `model.diffusion_model` directly, not `apply_model`: the WebUI wraps `apply_model` in its own
autocast and dtype casts, while the loop already decides precision (autocast on CUDA, none on the CPU).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers import CLIPTokenizer

from traintrain.devices import ConstantCache, host_tensor_on, host_values_on
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import Conditioning, LoraTarget, ModelKind, Prediction, placement
from traintrain.models.ldm_convert import text_encoder_ldm_to_diffusers_names, unet_ldm_to_diffusers_names
from traintrain.models.ldm_state import TrainingState
from traintrain.models.openclip_text import OpenClipText
from traintrain.models.targets import collect_targets, unet_kohya_paths
from traintrain.models.tokenizer import chunked_token_ids, clip_bpe_tokenizer

PARAMETERIZATION: dict[str, Prediction] = {"eps": "epsilon", "v": "v"}
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")  # SDXL's size embedders


class NamedModules:
    """LDM modules listed under their diffusers names: what `collect_targets` walks to name and place targets."""

    def __init__(self, pairs: list[tuple[str, nn.Module]]) -> None:
        self._pairs = pairs

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(diffusers name, LDM module) pairs in the diffusers order."""
        return iter(self._pairs)


class ClipText:
    """A CLIP text encoder in transformers' layout (SD1, SDXL's first): the embedder's `transformer` and `tokenizer`."""

    def __init__(self, embedder: nn.Module, prefix: str, penultimate: bool) -> None:
        self.module: nn.Module = embedder.transformer
        self.tokenizer: CLIPTokenizer = embedder.tokenizer
        self.prefix, self.penultimate = prefix, penultimate

    def tokenize(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids (B, chunks, 77) in 75-token chunks, on `device`."""
        return {"ids": host_tensor_on(device, chunked_token_ids(self.tokenizer, prompts))}

    def encode(self, tokens: Mapping[str, torch.Tensor], clip_skip: int) -> tuple[torch.Tensor, None]:
        """Chunks encoded separately and concatenated. SD1: the last layer, or with `clip_skip` N > 1 the N-th from
        last with the final norm (as the WebUI); SDXL: the penultimate layer as it is (no pooled output)."""
        ids = tokens["ids"]
        output = self.module(input_ids=ids.flatten(0, 1), output_hidden_states=True)
        if self.penultimate:
            hidden = output.hidden_states[-2]
        elif clip_skip > 1:
            hidden = getattr(self.module, "text_model", self.module).final_layer_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output.last_hidden_state
        return hidden.unflatten(0, ids.shape[:2]).flatten(1, 2), None

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """The transformers names already are the diffusers names."""
        return self.module.named_modules()


class OpenClipEncoder:
    """An OpenCLIP text encoder (SD2, SDXL's second) named as the transformers CLIP the kohya format uses."""

    def __init__(self, embedder: nn.Module, prefix: str, tokenizer: CLIPTokenizer, pooled: bool) -> None:
        self.text = OpenClipText(embedder.model, tokenizer)
        self.module: nn.Module = embedder.model
        self.prefix, self.pooled = prefix, pooled

    def tokenize(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids (B, chunks, 77; OpenCLIP padding) and each chunk's end-token position, on `device`."""
        ids, eos = self.text.token_ids(prompts)
        return {"ids": host_tensor_on(device, ids), "eos": host_tensor_on(device, eos)}

    def encode(self, tokens: Mapping[str, torch.Tensor], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunks encoded separately and concatenated. SD2: penultimate layer + ln_final (the WebUI's
        FrozenOpenCLIPEmbedder; no CLIP skip there); SDXL: the penultimate layer, and the pooled projection of the
        last at the first chunk's end token."""
        ids = tokens["ids"]
        penultimate, last = self.text.hidden_states(ids.flatten(0, 1))
        chunked = ids.shape[:2]
        if not self.pooled:
            return self.module.ln_final(penultimate).unflatten(0, chunked).flatten(1, 2), None
        pooled = self.text.pool(last.unflatten(0, chunked)[:, 0], tokens["eos"][:, 0])
        return penultimate.unflatten(0, chunked).flatten(1, 2), pooled

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Modules by transformers CLIP name; q/k/v are the Linear views over the fused attention projections. SD2
        conditions on the penultimate layer: its last block never acts, so it has no target (as in kohya's 23-layer
        SD2 text encoder)."""
        layers = self.text.num_layers - (0 if self.pooled else 1)
        for ldm_name, hf_name in text_encoder_ldm_to_diffusers_names("openclip", layers).items():
            yield hf_name, self.text.module_for(ldm_name.removeprefix("model."))


TextEncoder = ClipText | OpenClipEncoder


def model_kind(sd_model: Any) -> ModelKind:
    """sd1 / sd2 / sdxl from the WebUI's flags (`is_sdxl`, `is_sd2`), else from the conditioner / encoder layout."""
    if getattr(sd_model, "is_sd3", False):
        raise TrainTrainError("SD3 models cannot be trained by TrainTrain: load an SD1, SD2 or SDXL checkpoint.")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False) or hasattr(_unwrapped(sd_model.cond_stage_model), "model"):
        return "sd2"
    return "sd1"


def model_prediction(sd_model: Any) -> Prediction:
    """epsilon / v from the model's `parameterization` ("eps" / "v")."""
    parameterization = getattr(sd_model, "parameterization", "eps")
    if parameterization not in PARAMETERIZATION:
        raise TrainTrainError(
            f"The loaded model predicts {parameterization!r}, which TrainTrain cannot train: load an eps or v model."
        )
    return PARAMETERIZATION[parameterization]


def _unwrapped(embedder: nn.Module) -> nn.Module:
    """The ldm / sgm embedder inside the WebUI's prompt-parsing wrapper (`.wrapped`), or the embedder itself."""
    return getattr(embedder, "wrapped", embedder)


def _text_encoder(embedder: nn.Module, prefix: str, tokenizer: CLIPTokenizer | None, kind: ModelKind) -> TextEncoder:
    """The encoder for one embedder, by its layout: transformers CLIP (`transformer`) or OpenCLIP (`model`)."""
    inner = _unwrapped(embedder)
    if hasattr(inner, "transformer"):
        return ClipText(inner, prefix, penultimate=kind == "sdxl")
    if hasattr(inner, "model"):
        return OpenClipEncoder(inner, prefix, tokenizer or clip_bpe_tokenizer(), pooled=kind == "sdxl")
    raise TrainTrainError(f"Unsupported text encoder {type(inner).__name__}: load an SD1, SD2 or SDXL checkpoint.")


def diffusers_unet_config(unet: nn.Module) -> dict[str, Any]:
    """A diffusers UNet config naming the same layers as an LDM / sgm `UNetModel` (levels, depths, attention)."""
    layers = list(unet.num_res_blocks)
    if len(set(layers)) != 1:
        raise TrainTrainError(f"UNets with a different layer count per level ({layers}) are not supported.")
    levels, index, depths = len(unet.channel_mult), 1, []
    for level in range(levels):
        block = unet.input_blocks[index]
        depths.append(len(block[1].transformer_blocks) if len(block) > 1 else 0)
        index += layers[level] + (level < levels - 1)
    attention = [depth > 0 for depth in depths]
    first = next(m for m in unet.modules() if hasattr(m, "attn2"))
    return {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "block_out_channels": [unet.model_channels * mult for mult in unet.channel_mult],
        "layers_per_block": layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": [max(depth, 1) for depth in depths],
        "cross_attention_dim": first.attn2.to_k.in_features,
        "attention_head_dim": 1,  # names only: one head per attention
    }


class LdmBundle:
    """A ModelBundle over an LDM `LatentDiffusion` (SD1/SD2) or sgm `DiffusionEngine` (SDXL), as the WebUI has it.

    UNet and text encoders train in `dtype` (default: as loaded), the VAE encodes in `vae_dtype`. `tokenizer` is for
    OpenCLIP encoders, which carry none (default: SDXL's CLIP-L tokenizer, else the real CLIP BPE vocabulary).
    """

    def __init__(
        self,
        sd_model: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        vae_dtype: torch.dtype = torch.float32,
        tokenizer: CLIPTokenizer | None = None,
        clip_skip: int = 1,
    ) -> None:
        self.sd_model = sd_model
        self.kind: ModelKind = model_kind(sd_model)
        self.prediction: Prediction = model_prediction(sd_model)
        self.unet: nn.Module = sd_model.model.diffusion_model
        self.vae: nn.Module = sd_model.first_stage_model
        unet_device, unet_dtype = placement(self.unet)
        self.device = torch.device(device) if device is not None else unet_device
        self.dtype = dtype or unet_dtype
        self.vae_dtype = vae_dtype
        self.clip_skip = clip_skip  # the host's CLIP skip (the WebUI's CLIP_stop_at_last_layers), used by default
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        schedule = sd_model.alphas_cumprod if schedule is None else schedule
        self.alphas_cumprod = schedule.detach().to(self.device, torch.float32).clone()
        self.scale_factor = float(sd_model.scale_factor)
        self.encoders, self.size_embedders = self._encoders(tokenizer)
        self._state: TrainingState | None = None
        self._targets: list[LoraTarget] | None = None
        self._constants = ConstantCache()

    def _encoders(self, tokenizer: CLIPTokenizer | None) -> tuple[list[TextEncoder], list[nn.Module]]:
        """The text encoders (lora_te, or lora_te1 / lora_te2 for SDXL) and SDXL's size embedders."""
        if self.kind != "sdxl":
            return [_text_encoder(self.sd_model.cond_stage_model, "lora_te", tokenizer, self.kind)], []
        embedders = list(self.sd_model.conditioner.embedders)
        texts = [e for e in embedders if getattr(e, "input_key", "txt") == "txt"]
        sizes = [e for e in embedders if getattr(e, "input_key", "txt") in SIZE_KEYS]
        if len(texts) != 2 or len(texts) + len(sizes) != len(embedders):
            keys = [getattr(e, "input_key", "txt") for e in embedders]
            raise TrainTrainError(f"Unsupported SDXL conditioner {keys}: load an SDXL base model (not a refiner).")
        first = _text_encoder(texts[0], "lora_te1", tokenizer, self.kind)
        second = _text_encoder(texts[1], "lora_te2", tokenizer or getattr(first, "tokenizer", None), self.kind)
        return [first, second], sizes

    @property
    def _pixels_per_latent(self) -> int:
        """8 for SD's VAEs: 2 ** (levels - 1)."""
        return 2 ** (self.vae.encoder.num_resolutions - 1)

    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Raw captions through the text encoders (no prompt-emphasis parsing); SDXL also gets TE2's pooled output."""
        return self.encode_tokens(self.tokenize(prompts))

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each text encoder's token tensors, named `<name>_<encoder index>` (ids_0, eos_1, ...), on the device."""
        return {
            f"{name}_{index}": tensor
            for index, encoder in enumerate(self.encoders)
            for name, tensor in encoder.tokenize(prompts, self.device).items()
        }

    def encode_tokens(self, tokens: Mapping[str, torch.Tensor]) -> Conditioning:
        """`encode_text` from `tokenize`'s tensors."""
        outputs = []
        for index, encoder in enumerate(self.encoders):
            own = {name.rsplit("_", 1)[0]: t for name, t in tokens.items() if name.rsplit("_", 1)[1] == str(index)}
            outputs.append(encoder.encode(own, self.clip_skip))
        pooled = next((p for _, p in outputs if p is not None), None)
        return Conditioning(torch.cat([context for context, _ in outputs], dim=-1), pooled)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels → a latent sample × `scale_factor`, float32 (LDM's VAE returns a distribution, sgm's a sample)."""
        device, dtype = placement(self.vae)
        encoded = self.vae.encode(pixels.to(device, dtype))
        latents = encoded.sample() if hasattr(encoded, "sample") else encoded
        return (latents * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels clamped to [-1,1], float32."""
        device, dtype = placement(self.vae)
        pixels = self.vae.decode(latents.to(device, dtype) / self.scale_factor)
        return pixels.float().clamp(-1.0, 1.0)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet output; SDXL's `y` is TE2's pooled output and the size embeddings of `sizes` (default: the batch's
        pixel size, uncropped)."""
        noisy = noisy_latents.to(self.device, self.dtype)
        context = cond.context.to(self.device, self.dtype)
        timesteps = timesteps.to(self.device)
        if self.kind != "sdxl":
            return self.unet(noisy, timesteps, context=context)
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding.")
        embedded = self._size_embedding(noisy) if sizes is None else self._embed_sizes(sizes.to(self.device).float())
        vector = torch.cat([cond.pooled.to(self.device), embedded], dim=1)
        return self.unet(noisy, timesteps, context=context, y=vector.to(self.dtype))

    def _size_embedding(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's own size / crop embeddings for an uncropped image of the latents' pixel size (built once per
        size and batch: they are constants of the step)."""
        height, width = (side * self._pixels_per_latent for side in latents.shape[-2:])

        def build() -> torch.Tensor:
            rows = host_values_on(self.device, [[height, width, 0, 0, height, width]] * len(latents), torch.float32)
            return self._embed_sizes(rows)

        return self._constants.get(("size", height, width, len(latents), self.device), build)

    def _embed_sizes(self, sizes: torch.Tensor) -> torch.Tensor:
        """The model's size / crop embeddings of `sizes` (B,6): original, crop top-left, target (height, width)."""
        columns = dict(zip(SIZE_KEYS, sizes.split(2, dim=1)))
        return torch.cat([embedder(columns[embedder.input_key]) for embedder in self.size_embedders], dim=1)

    def lora_targets(self) -> list[LoraTarget]:
        """UNet and text-encoder layers under kohya's names (the same as the diffusers adapter's)."""
        if self._targets is None:
            config = diffusers_unet_config(self.unet)
            names = unet_ldm_to_diffusers_names(config)
            try:
                pairs = [(hf_name, self.unet.get_submodule(ldm_name)) for ldm_name, hf_name in names.items()]
            except AttributeError as error:
                raise TrainTrainError(f"This UNet layout is not supported ({error}).") from error
            encoders = [(encoder.prefix, encoder) for encoder in self.encoders]  # both list named_modules()
            layers_per_block = list(self.unet.num_res_blocks)[0]
            self._targets = collect_targets(
                NamedModules(pairs),  # type: ignore[arg-type]
                encoders,  # type: ignore[arg-type]
                layers_per_block,
                unet_kohya_paths(self.kind, config),
            )
        return self._targets

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the UNet's transformer and resnet blocks in the backward pass (only inside `training()`)."""
        if self._state is None:
            raise RuntimeError("Gradient checkpointing is set inside training().")
        self._state.set_checkpointing(enabled)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Freeze, eval, place on device / dtype; afterwards the exact prior state, error or not."""
        text = [encoder.module for encoder in self.encoders]
        self._state = TrainingState([self.unet, *text, self.vae], self.unet)
        try:
            for module in (self.unet, *text):
                self._state.place(module, self.device, self.dtype)
            self._state.place(self.vae, self.device, self.vae_dtype)
            if isinstance(vars(self.unet).get("dtype"), torch.dtype):  # the dtype LDM's forward casts its input to
                self._state.override(self.unet, "dtype", self.dtype)
            self._state.prepare()
            yield
        finally:
            state, self._state = self._state, None
            state.restore()
