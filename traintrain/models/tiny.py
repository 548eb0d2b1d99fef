"""Seeded tiny SD1 / SD2-v / SDXL models (random weights, real architectures) for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelKind
from traintrain.models.diffusers_backend import Components, DiffusersBundle, ddpm_alphas_cumprod
from traintrain.models.tokenizer import END, MAX_TOKENS, tiny_clip_tokenizer

KINDS: tuple[ModelKind, ...] = ("sd1", "sd2", "sdxl")
OPEN_CLIP_PAD = "!"  # SD2's and SDXL's second tokenizer pad with "!" (id 0), CLIP-L with <|endoftext|>
SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}

_UNET_COMMON: dict[str, Any] = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
_UNET: dict[str, dict[str, Any]] = {
    "sd1": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    "sd2": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=80,  # TE1 width 32 + TE2 width 48
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 48,  # six size ids x 8 + TE2 pooled width
    ),
}
VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(8, 16, 32, 32),  # four levels: 64 px -> 8x8 latent, like SD
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
)


def _text_config(width: int, act: str, pad_token_id: int, projection: bool = False) -> CLIPTextConfig:
    """A two-layer CLIP text config over the 514-token char vocabulary (bos 512, eos 513)."""
    extra = {"projection_dim": width} if projection else {}
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=width,
        intermediate_size=width + width // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=pad_token_id,
        **extra,
    )


def _text_encoders(kind: ModelKind) -> tuple[list[torch.nn.Module], list[Any]]:
    """Text encoders and their tokenizers: CLIP-L-like for sd1, OpenCLIP-like for sd2, both (different widths) for sdxl."""
    clip_l, open_clip = tiny_clip_tokenizer(END), tiny_clip_tokenizer(OPEN_CLIP_PAD)
    if kind == "sd1":
        return [CLIPTextModel(_text_config(32, "quick_gelu", clip_l.pad_token_id))], [clip_l]
    if kind == "sd2":
        return [CLIPTextModel(_text_config(48, "gelu", open_clip.pad_token_id))], [open_clip]
    te1 = CLIPTextModel(_text_config(32, "quick_gelu", clip_l.pad_token_id))
    te2 = CLIPTextModelWithProjection(_text_config(48, "gelu", open_clip.pad_token_id, projection=True))
    return [te1, te2], [clip_l, open_clip]


def like_a_trained_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """Give the random VAE a trained VAE's statistics: a narrow posterior (std ≈ 0.002, so the encoding is the image,
    not sampling noise) and means that, times the scaling factor, have unit variance on images (as SD's 0.18215 does)."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(-12.0)
        probe = torch.rand(4, 3, 64, 64) * 2 - 1
        spread = vae.encode(probe).latent_dist.mean.std() * vae.config.scaling_factor
        vae.quant_conv.weight[:channels] /= spread
        vae.quant_conv.bias[:channels] /= spread
    return vae


def build_tiny_components(kind: ModelKind = "sd1", seed: int = 0) -> Components:
    """Random tiny components of `kind`; the same seed gives bit-identical weights (the global RNG is left untouched)."""
    if kind not in KINDS:
        raise TrainTrainError(f"Unknown tiny model kind {kind!r}: choose one of {', '.join(KINDS)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_UNET_COMMON, **_UNET[kind])
        vae = like_a_trained_vae(AutoencoderKL(**VAE_CONFIG, scaling_factor=SCALING_FACTOR[kind]))
        encoders, tokenizers = _text_encoders(kind)
    for module in (unet, vae, *encoders):
        module.eval()
    prediction = "v" if kind == "sd2" else "epsilon"
    return Components(unet, vae, encoders, tokenizers, kind, prediction, ddpm_alphas_cumprod())


def build_tiny(
    kind: ModelKind = "sd1", seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusersBundle:
    """A DiffusersBundle over freshly built tiny components."""
    return DiffusersBundle(build_tiny_components(kind, seed), device=device, dtype=dtype)


def _scheduler(components: Components) -> DDIMScheduler:
    """SD's DDIM scheduler config (scaled_linear 0.00085..0.012) with the model's prediction type."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if components.prediction == "v" else "epsilon",
    )


def _pipeline(components: Components) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The diffusers pipeline holding `components` (no safety checker)."""
    c = components
    common = dict(vae=c.vae, unet=c.unet, scheduler=_scheduler(c), text_encoder=c.text_encoders[0])
    if c.kind == "sdxl":
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=c.text_encoders[1], tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1]
        )
    return StableDiffusionPipeline(
        **common, tokenizer=c.tokenizers[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_tiny_pipeline(kind: ModelKind, folder: Path, seed: int = 0) -> Path:
    """Save the tiny model as a diffusers folder (loadable offline by from_pretrained); `folder` must be absent or empty."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise TrainTrainError(f"{folder} is not empty: choose a new or empty folder for the tiny pipeline.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _pipeline(build_tiny_components(kind, seed)).save_pretrained(staging, safe_serialization=True)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder
