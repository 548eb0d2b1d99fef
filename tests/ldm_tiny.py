"""Tiny WebUI-style model objects built with the `ldm` package (stable-diffusion-sdkit), for the LDM adapter's tests.

The UNet is ldm's real `UNetModel`, loaded with the weights of the tiny diffusers model of the same kind (through
`ldm_convert`), so the LDM adapter can be compared with the diffusers one. Around it sit small stand-ins shaped like
the WebUI's objects (the shared ones from `traintrain.bench.webui_layout`): ldm's `AutoencoderKL` (ldm's real Encoder /
Decoder), `FrozenCLIPEmbedder` (a transformers CLIPTextModel), an open_clip text tower (open_clip needs torchvision, which cannot be installed here), the WebUI's
prompt wrappers (`.wrapped`) and sgm's size embedders.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict

import pytest
import torch
from torch import nn

ldm_openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
from ldm.modules.diffusionmodules.util import timestep_embedding  # noqa: E402

from traintrain.bench.webui_layout import (  # noqa: E402
    AutoencoderKL,
    CustomWords,
    FrozenCLIPEmbedder,
    LatentDiffusion,
)
from traintrain.models.diffusers_backend import Components  # noqa: E402
from traintrain.models.ldm_convert import text_encoder_state_dict_to_ldm, unet_state_dict_to_ldm  # noqa: E402
from traintrain.models.tiny import build_tiny_components  # noqa: E402

# ldm UNetModel arguments equal to traintrain.models.tiny's diffusers UNets (channels 32/64, one layer per level).
UNET_ARGS = {
    "sd1": dict(attention_resolutions=[1], num_heads=8, context_dim=32),
    "sd2": dict(attention_resolutions=[1], num_head_channels=8, context_dim=48, use_linear_in_transformer=True),
    "sdxl": dict(
        attention_resolutions=[2],
        num_head_channels=16,
        context_dim=[80, 80],
        use_linear_in_transformer=True,
        transformer_depth=2,  # ldm's SpatialTransformer wants one context dim per transformer block
    ),
}
VAE_ARGS = dict(
    double_z=True,
    z_channels=4,
    resolution=64,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def ldm_unet(kind: str, **overrides) -> nn.Module:
    """ldm's UNetModel with the tiny model's layout (or real-size overrides), eval mode."""
    args = dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2],
        use_spatial_transformer=True,
        legacy=False,
    )
    args.update(UNET_ARGS[kind])
    args.update(overrides)
    return ldm_openaimodel.UNetModel(**args).eval()


def _spatial_transformer_forward(self, x, context=None):
    """sgm's SpatialTransformer.forward: one context for every transformer block (ldm 2.x indexes a list per block)."""
    _, _, height, width = x.shape
    x_in, x = x, self.norm(x)
    x = self.proj_in(x) if not self.use_linear else x
    x = x.flatten(2).transpose(1, 2)
    x = self.proj_in(x) if self.use_linear else x
    for block in self.transformer_blocks:
        x = block(x, context=context)
    x = self.proj_out(x) if self.use_linear else x
    x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
    return (x if self.use_linear else self.proj_out(x)) + x_in


def make_sdxl(unet: nn.Module, adm_in_channels: int) -> None:
    """sgm's UNet from ldm's: `num_classes="sequential"` label embedding (ldm's forward adds `label_emb(y)`) and
    transformers deeper than one block."""
    dim = unet.model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, dim), nn.SiLU(), nn.Linear(dim, dim)))
    for module in unet.modules():
        if hasattr(module, "transformer_blocks"):
            module.forward = types.MethodType(_spatial_transformer_forward, module)


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """sgm's SDXL VAE wrapper: encode returns a sample."""

    def __init__(self) -> None:
        super().__init__(**VAE_ARGS)

    def encode(self, x):
        return super().encode(x).sample()


class ResidualAttentionBlock(nn.Module):
    """open_clip's block: ln_1, attn (fused nn.MultiheadAttention), ln_2, mlp (c_fc, gelu, c_proj)."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ls_1, self.ls_2 = nn.Identity(), nn.Identity()
        mlp = [("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))]
        self.mlp = nn.Sequential(OrderedDict(mlp))

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = self.ln_1(q_x)
        x = q_x + self.ls_1(self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, hidden) for _ in range(layers)])


class OpenClipText(nn.Module):
    """The text half of open_clip's CLIP (the WebUI deletes `visual`), sequence-first like open_clip 2.20."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, hidden: int, projection: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.zeros(77, width))
        self.transformer = Transformer(width, layers, heads, hidden)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, projection))
        self.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu(1), persistent=False)


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm FrozenOpenCLIPEmbedder / sgm FrozenOpenCLIPEmbedder2: the open_clip model (no tokenizer attribute)."""

    input_key = "txt"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size / crop embedder: sinusoidal embedding of each number, concatenated."""

    def __init__(self, input_key: str, outdim: int) -> None:
        super().__init__()
        self.input_key, self.outdim = input_key, outdim

    def forward(self, x):
        return timestep_embedding(x.flatten(), self.outdim).reshape(x.shape[0], -1)


class Conditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


def openclip_from_hf(encoder: nn.Module, extra_block: bool = False) -> OpenClipText:
    """An open_clip text tower holding the weights of a transformers CLIP text model (via ldm_convert). With
    `extra_block`, one more (random) block after them: SD2's real layout, whose 23-layer diffusers encoder is the
    24-block OpenCLIP without its last block."""
    config = encoder.config
    projection = getattr(config, "projection_dim", config.hidden_size) if hasattr(encoder, "text_projection") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = OpenClipText(
            config.vocab_size,
            config.hidden_size,
            config.num_hidden_layers + extra_block,
            config.num_attention_heads,
            config.intermediate_size,
            projection or config.hidden_size,
        )
    state = text_encoder_state_dict_to_ldm(encoder.state_dict(), "openclip")
    missing, unexpected = model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    last = f"transformer.resblocks.{config.num_hidden_layers}."
    assert not unexpected and all(extra_block and key.startswith(last) for key in missing), (missing, unexpected)
    return model.eval()


def build_ldm_model(kind: str, seed: int = 0, wrapped: bool = True) -> tuple[LatentDiffusion, Components]:
    """A tiny WebUI-style model of `kind` and the diffusers components whose weights it carries."""
    components = build_tiny_components(kind, seed)
    config = components.unet.config
    unet = ldm_unet(kind)
    if kind == "sdxl":
        make_sdxl(unet, config.projection_class_embeddings_input_dim)
    unet.load_state_dict(unet_state_dict_to_ldm(components.unet.state_dict(), config), strict=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = (AutoencoderKLInferenceWrapper() if kind == "sdxl" else AutoencoderKL(**VAE_ARGS)).eval()
    wrap = CustomWords if wrapped else (lambda embedder: embedder)
    encoders, tokenizers = components.text_encoders, components.tokenizers
    if kind == "sd1":
        text = wrap(FrozenCLIPEmbedder(copy.deepcopy(encoders[0]), tokenizers[0]))
    elif kind == "sd2":
        text = wrap(FrozenOpenCLIPEmbedder(openclip_from_hf(encoders[0], extra_block=True)))
    else:
        sizes = [
            ConcatTimestepEmbedderND(key, 8)
            for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
        ]
        first = wrap(FrozenCLIPEmbedder(copy.deepcopy(encoders[0]), tokenizers[0]))
        text = Conditioner([first, wrap(FrozenOpenCLIPEmbedder(openclip_from_hf(encoders[1]))), *sizes])
    parameterization = "v" if components.prediction == "v" else "eps"
    model = LatentDiffusion(kind, unet, vae, text, components.alphas_cumprod, parameterization)
    for parameter in model.model.parameters():
        parameter.requires_grad_(True)  # as in the WebUI: UNet weights keep requires_grad
    return model.eval(), components
