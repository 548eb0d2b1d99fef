"""What the real-WebUI check writes before it starts the WebUI: tiny SD1 and SDXL checkpoints with yamls that the
WebUI's own `ldm` / `sgm` code builds, their text encoders' local config folders, and two stand-in extensions.

The SDXL yaml is the WebUI's `sd_xl_base.yaml` with tiny sizes. Its second text encoder is built by open_clip from a
model config that does not ship with open_clip: the `tiny-open-clip` stand-in registers it from its `preload.py`,
which the WebUI runs before it builds any model. The `other-trainer` stand-in ships a top-level `trainer` package (as
the original TrainTrain does) and reports over HTTP which `trainer` its script imported.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from traintrain.models.bundle import ModelKind
from traintrain.models.diffusers_backend import Components
from traintrain.models.ldm_convert import save_single_file
from traintrain.models.tiny import SCALING_FACTOR, VAE_CONFIG, build_tiny_components, like_a_trained_vae
from traintrain.models.tokenizer import END, START, clip_bpe_tokenizer, tiny_clip_tokenizer

SD1, SDXL = "tiny-sd1", "tiny-sdxl"
OPEN_CLIP_ARCH = "TinyTextG"  # the open_clip model name SDXL's second encoder is built from
OTHER_TRAINER_ROUTE = "/other-trainer/package"
SDXL_BASE_YAML = Path("repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")

# A v1-inference.yaml with the tiny model's sizes. The UNet has SD's two layers per level (the Lora extension's
# diffusers-name converter assumes it); the VAE has 32 channels per level (ldm's GroupNorm has 32 groups).
SD1_YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: "{clip}"
"""

# The tiny SDXL UNet (traintrain.models.tiny, two layers per level) in sgm's UNetModel terms.
SDXL_UNET = dict(
    adm_in_channels=6 * 8 + 48,  # three size embedders x 2 values x 8, plus TE2's pooled width
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=2,
    attention_resolutions=[2],  # attention on the second level only, as SDXL has none on its first
    transformer_depth=[1, 2],
    num_head_channels=16,
    context_dim=32 + 48,  # TE1 + TE2 widths
    use_checkpoint=False,
    spatial_transformer_attn_type="softmax",
)
SIZE_EMBEDDER_WIDTH = 8  # the tiny UNet's addition_time_embed_dim
TINY_VAE = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, resolution=64, attn_type="vanilla")


def tiny_ldm_vae(kind: ModelKind) -> AutoencoderKL:
    """The tiny VAE with 32 channels per level (ldm's and sgm's GroupNorm has 32 groups)."""
    config = {**VAE_CONFIG, "block_out_channels": (32,) * 4, "norm_num_groups": 32}
    return like_a_trained_vae(AutoencoderKL(**config, scaling_factor=SCALING_FACTOR[kind])).eval()


def sgm_text_encoders(components: Components, tokenizer: CLIPTokenizer) -> list[torch.nn.Module]:
    """The tiny SDXL text encoders over the real CLIP vocabulary (the WebUI tokenizes TE2 with open_clip's), TE2
    with open_clip's fixed MLP width (4 x width)."""
    te1, te2 = (encoder.config.to_dict() for encoder in components.text_encoders)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    first = CLIPTextModel(CLIPTextConfig.from_dict({**te1, **ids, "pad_token_id": tokenizer.eos_token_id}))
    te2.update(ids, pad_token_id=0, intermediate_size=4 * te2["hidden_size"])
    second = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(te2))
    return [first.eval(), second.eval()]


def webui_components(kind: ModelKind, sdxl_tokenizer: CLIPTokenizer | None = None) -> Components:
    """The tiny model of `kind` with two layers per level (as SD's UNets), the 32-channel VAE and, for SDXL,
    sgm-buildable text encoders over `sdxl_tokenizer`'s vocabulary."""
    components = build_tiny_components(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config({**components.unet.config, "layers_per_block": 2}).eval()
        vae = tiny_ldm_vae(kind)
        encoders = components.text_encoders
        if kind == "sdxl":
            encoders = sgm_text_encoders(components, sdxl_tokenizer or clip_bpe_tokenizer())
    return dataclasses.replace(components, unet=unet, vae=vae, text_encoders=encoders)


def write_clip_folder(folder: Path, encoder: torch.nn.Module, tokenizer: CLIPTokenizer) -> None:
    """A FrozenCLIPEmbedder `version` folder: the encoder's config.json and the tokenizer's files (the WebUI reads only
    these; the weights come from the checkpoint, so nothing is fetched)."""
    folder.mkdir(parents=True)
    encoder.config.to_json_file(str(folder / "config.json"))
    tokenizer.save_vocabulary(str(folder))
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    settings = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")


def sdxl_yaml(webui_dir: Path, clip_dir: Path) -> dict[str, Any]:
    """The WebUI's sd_xl_base.yaml with the tiny sizes, TE1 from `clip_dir` and TE2 from the tiny open_clip config."""
    config = yaml.safe_load((webui_dir / SDXL_BASE_YAML).read_text(encoding="utf-8"))
    params = config["model"]["params"]
    params["network_config"]["params"].update(SDXL_UNET)
    te1, te2, *sizes = params["conditioner_config"]["params"]["emb_models"]
    te1["params"].update(version=str(clip_dir), layer_idx=-2)  # the penultimate layer, as 11 of CLIP-L's 12
    te2["params"]["arch"] = OPEN_CLIP_ARCH
    for embedder in sizes:
        embedder["params"]["outdim"] = SIZE_EMBEDDER_WIDTH
    params["first_stage_config"]["params"]["ddconfig"].update(TINY_VAE)
    return config


def open_clip_config(encoder: CLIPTextModelWithProjection) -> dict[str, Any]:
    """An open_clip model config whose text tower is `encoder` (the vision tower, which SDXL drops, is minimal)."""
    text = encoder.config
    return {
        "embed_dim": text.projection_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
        },
    }


def write_checkpoints(data: Path, webui_dir: Path) -> dict[str, Path]:
    """tiny-sd1 and tiny-sdxl (+ yamls) in `<data>/models/Stable-diffusion`, their CLIP folders, and the
    tiny-open-clip extension that registers SDXL's second encoder with open_clip."""
    folder = data / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    char_tokenizer, bpe_tokenizer = tiny_clip_tokenizer(), clip_bpe_tokenizer()
    sd1 = webui_components("sd1")
    write_clip_folder(data / "clip-sd1", sd1.text_encoders[0], char_tokenizer)
    (folder / f"{SD1}.yaml").write_text(SD1_YAML.replace("{clip}", str(data / "clip-sd1")), encoding="utf-8")

    sdxl = webui_components("sdxl", bpe_tokenizer)
    write_clip_folder(data / "clip-sdxl", sdxl.text_encoders[0], bpe_tokenizer)
    config = sdxl_yaml(webui_dir, data / "clip-sdxl")
    (folder / f"{SDXL}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    write_open_clip_extension(data / "extensions" / "tiny-open-clip", open_clip_config(sdxl.text_encoders[1]))
    return {
        SD1: save_single_file(sd1, folder / f"{SD1}.safetensors"),
        SDXL: save_single_file(sdxl, folder / f"{SDXL}.safetensors"),
    }


OPEN_CLIP_PRELOAD = '''"""Registers the tiny open_clip model configs in `open_clip_configs/` before the WebUI builds a model."""
from pathlib import Path

import open_clip

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")
'''


def write_open_clip_extension(folder: Path, config: dict[str, Any]) -> None:
    """An extension whose preload.py registers `config` with open_clip as OPEN_CLIP_ARCH."""
    (folder / "open_clip_configs").mkdir(parents=True)
    (folder / "open_clip_configs" / f"{OPEN_CLIP_ARCH}.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "preload.py").write_text(OPEN_CLIP_PRELOAD, encoding="utf-8")


OTHER_TRAINER_SCRIPT = f'''"""Imports this extension's own top-level `trainer` package and reports, over HTTP, which one Python gave it."""
import importlib

import trainer
from modules import script_callbacks


def report(_demo, app):
    def package():
        now = importlib.import_module("trainer")
        return {{"at_load": trainer.__file__, "now": now.__file__, "owner": getattr(now, "OWNER", None)}}

    app.add_api_route("{OTHER_TRAINER_ROUTE}", package, methods=["GET"])


script_callbacks.on_app_started(report)
'''


def write_other_trainer_extension(folder: Path) -> None:
    """A stand-in for another extension with a top-level `trainer` package and a script importing it."""
    (folder / "trainer").mkdir(parents=True)
    (folder / "trainer" / "__init__.py").write_text('OWNER = "other-trainer"\n', encoding="utf-8")
    (folder / "scripts").mkdir()
    (folder / "scripts" / "other_trainer.py").write_text(OTHER_TRAINER_SCRIPT, encoding="utf-8")
