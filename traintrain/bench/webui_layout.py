"""Models in the WebUI's layout for `bench --adapter ldm` (and the LDM adapter's tests): ldm's own `UNetModel` and VAE
`Encoder` / `Decoder` (the code the WebUI runs for SD1 / SD2, from the `ldm` package), a transformers CLIP text model
in ldm's `FrozenCLIPEmbedder` shape with the WebUI's prompt wrapper (`.wrapped`), inside the attributes the WebUI's
model object exposes. `webui_unet_patches` gives ldm's UNet what the WebUI's hijacks give it: timestep embeddings
built on the device and `scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from traintrain.errors import TrainTrainError
from traintrain.models.tiny import SCALING_FACTOR

try:
    from ldm.modules import attention as ldm_attention
    from ldm.modules.diffusionmodules import openaimodel as ldm_openaimodel
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
except ImportError as error:  # the WebUI has it; standalone: pip install stable-diffusion-sdkit==2.1.5 --no-deps
    raise TrainTrainError(
        "The WebUI layout needs the `ldm` package: pip install stable-diffusion-sdkit==2.1.5 --no-deps"
    ) from error

SD15_UNET: dict[str, Any] = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=True,
    legacy=False,
)
SD15_VAE: dict[str, Any] = dict(
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)


class AutoencoderKL(nn.Module):
    """ldm.models.autoencoder.AutoencoderKL without pytorch_lightning: encode → posterior, decode(z)."""

    def __init__(self, **args: Any) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(**args), Decoder(**args)
        z = args["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class FrozenCLIPEmbedder(nn.Module):
    """ldm / sgm FrozenCLIPEmbedder: a transformers CLIPTextModel and its tokenizer."""

    input_key = "txt"

    def __init__(self, transformer: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.transformer, self.tokenizer = transformer, tokenizer


class CustomWords(nn.Module):
    """The WebUI's prompt-parsing wrapper (FrozenCLIPEmbedderWithCustomWords & co.) around an embedder."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.input_key = getattr(wrapped, "input_key", "txt")


class DiffusionWrapper(nn.Module):
    """`sd_model.model`: holds the UNet as `diffusion_model`."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class LatentDiffusion(nn.Module):
    """The attributes the WebUI's model object exposes: model, first_stage_model, text conditioning, schedule, flags."""

    def __init__(
        self,
        kind: str,
        unet: nn.Module,
        vae: nn.Module,
        text: nn.Module,
        alphas_cumprod: torch.Tensor,
        parameterization: str,
    ) -> None:
        super().__init__()
        self.model, self.first_stage_model = DiffusionWrapper(unet), vae
        if kind == "sdxl":
            self.conditioner = text
        else:
            self.cond_stage_model = text
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())
        self.parameterization, self.scale_factor = parameterization, SCALING_FACTOR[kind]
        self.is_sd1, self.is_sd2, self.is_sdxl = kind == "sd1", kind == "sd2", kind == "sdxl"


def random_webui_sd15(device: torch.device, dtype: torch.dtype) -> LatentDiffusion:
    """A random-weight SD1.5 in the WebUI's layout: UNet and text encoder in `dtype`, VAE in fp32, on `device`
    (built on the meta device and materialised there, so nothing large is allocated twice)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from traintrain.bench.models import materialise
    from traintrain.models.checkpoint import shipped_config_dir
    from traintrain.models.diffusers_backend import ddpm_alphas_cumprod
    from traintrain.models.tokenizer import END, clip_bpe_tokenizer

    folder = shipped_config_dir("sd1")
    with init_empty_weights():
        unet = ldm_openaimodel.UNetModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True))
    materialise(unet, device, dtype)
    materialise(vae, device, torch.float32)
    materialise(text, device, dtype)
    embedder = CustomWords(FrozenCLIPEmbedder(text, clip_bpe_tokenizer(END)))
    model = LatentDiffusion("sd1", unet, vae, embedder, ddpm_alphas_cumprod(), "eps")
    return model.to(device).eval()


@contextlib.contextmanager
def webui_unet_patches() -> Iterator[None]:
    """While inside, ldm's UNet embeds timesteps on their device and its attention runs through
    `scaled_dot_product_attention`, as in the WebUI (its UNet hijack and its default "sdp" optimisation)."""
    embedding, forward = ldm_openaimodel.timestep_embedding, ldm_attention.CrossAttention.forward
    ldm_openaimodel.timestep_embedding = timestep_embedding_on_device
    ldm_attention.CrossAttention.forward = _sdpa_forward
    try:
        yield
    finally:
        ldm_openaimodel.timestep_embedding = embedding
        ldm_attention.CrossAttention.forward = forward


def timestep_embedding_on_device(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal timestep embeddings (cos half, then sin half), every tensor made on the timesteps' device."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps[:, None].float() * torch.exp(-math.log(max_period) * steps / half)[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _sdpa_forward(
    self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ldm CrossAttention through `scaled_dot_product_attention` (SD's UNet never passes a mask)."""
    if mask is not None:
        raise ValueError("The SDPA attention of the bench takes no mask.")
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, tokens, width = q.shape
    q, k, v = (t.view(batch, t.shape[1], self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(batch, tokens, width))
