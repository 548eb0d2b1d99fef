"""LoRA target discovery on real-size SD1.5 / SDXL architectures built on the meta device (no memory, no weights)."""

import re
from collections import Counter

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from traintrain.models.bundle import ROLE_CROSS_ATTN, ROLE_RESNET, ROLE_SELF_ATTN, ROLE_TEXT, ROLE_TRANSFORMER
from traintrain.models.targets import collect_targets, unet_block_of, unet_kohya_paths

LIERLA_ROLES = {ROLE_SELF_ATTN, ROLE_CROSS_ATTN, ROLE_TRANSFORMER}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


def blocks(prefix: str, numbers: range) -> set[str]:
    return {f"{prefix}{n:02d}" for n in numbers}


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    assert unet_kohya_paths("sd1", unet.config) is None  # SD1 / SD2: kohya's diffusers-style names
    return collect_targets(unet, [("lora_te", te)], 2, unet_kohya_paths("sd1", unet.config)), unet, te


@pytest.fixture(scope="module")
def sdxl():
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048,
        )
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    targets = collect_targets(unet, [("lora_te1", te1), ("lora_te2", te2)], 2, unet_kohya_paths("sdxl", unet.config))
    return targets, unet


def test_sd15_lierla_counts_and_blocks(sd15):
    targets, _, _ = sd15
    lierla = [t for t in targets if t.role in LIERLA_ROLES]
    assert len(lierla) == 192
    assert len([t for t in targets if t.role == ROLE_TEXT]) == 72
    assert Counter(t.role for t in lierla) == {ROLE_SELF_ATTN: 64, ROLE_CROSS_ATTN: 64, ROLE_TRANSFORMER: 64}
    expected = {"IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"} | blocks("OUT", range(3, 12))
    assert {t.block for t in lierla} == expected


def test_sd15_all_blocks_and_module_kinds(sd15):
    targets, unet, _ = sd15
    assert {t.block for t in targets} == {"BASE", "M00"} | blocks("IN", range(1, 12)) | blocks("OUT", range(12))
    assert all(isinstance(t.module, (nn.Linear, nn.Conv2d)) for t in targets)
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    excluded = (unet.conv_in, unet.conv_out, unet.time_embedding.linear_1)
    assert not any(t.module is module for t in targets for module in excluded)


def test_sd15_exact_names(sd15):
    targets, unet, te = sd15
    by_name = {t.name: t for t in targets}
    attn = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"]
    assert attn.module is unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0]
    assert (attn.block, attn.role) == ("IN01", ROLE_SELF_ATTN)
    cross = by_name["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"]
    assert (cross.block, cross.role) == ("OUT11", ROLE_CROSS_ATTN)
    assert by_name["lora_unet_mid_block_attentions_0_proj_in"].block == "M00"
    assert by_name["lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj"].role == ROLE_TRANSFORMER
    down = by_name["lora_unet_down_blocks_2_downsamplers_0_conv"]
    assert (down.block, down.role) == ("IN09", ROLE_RESNET)
    assert by_name["lora_unet_up_blocks_1_upsamplers_0_conv"].block == "OUT05"
    assert by_name["lora_unet_down_blocks_3_resnets_1_time_emb_proj"].block == "IN11"
    fc1 = by_name["lora_te_text_model_encoder_layers_11_mlp_fc1"]
    assert fc1.module is te.text_model.encoder.layers[11].mlp.fc1
    assert (fc1.block, fc1.role) == ("BASE", ROLE_TEXT)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in by_name


def test_sdxl_counts_blocks_and_prefixes(sdxl):
    sdxl, _ = sdxl
    lierla = [t for t in sdxl if t.role in LIERLA_ROLES]
    assert len(lierla) == 722
    text = Counter(t.name.split("_text_model_")[0] for t in sdxl if t.role == ROLE_TEXT)
    assert text == {"lora_te1": 72, "lora_te2": 192}
    assert {t.block for t in lierla} == {"IN04", "IN05", "IN07", "IN08", "M00"} | blocks("OUT", range(6))
    assert {t.block for t in sdxl} == {"BASE", "M00"} | blocks("IN", range(1, 9)) | blocks("OUT", range(9))
    names = {t.name for t in sdxl}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v" in names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in names
    assert not any("text_projection" in name for name in names)
    unet = [name for name in names if name.startswith("lora_unet_")]
    assert all(re.match(r"lora_unet_(input_blocks_[1-8]|middle_block|output_blocks_[0-8])_\d+_", n) for n in unet)


@pytest.mark.parametrize(
    ("name", "module", "block", "role"),
    [  # kohya's compvis-style SDXL names: LDM paths, resnet parts renamed as in LDM
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "IN04",
            ROLE_SELF_ATTN,
        ),
        (
            "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
            "IN08",
            ROLE_CROSS_ATTN,
        ),
        ("middle_block_1_proj_in", "mid_block.attentions.0.proj_in", "M00", ROLE_TRANSFORMER),
        ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2", "M00", ROLE_RESNET),
        ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv", "OUT02", ROLE_RESNET),
        ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv", "OUT05", ROLE_RESNET),
        (
            "output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
            "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
            "OUT05",
            ROLE_TRANSFORMER,
        ),
        ("output_blocks_8_0_skip_connection", "up_blocks.2.resnets.2.conv_shortcut", "OUT08", ROLE_RESNET),
        ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1", "IN01", ROLE_RESNET),
        ("input_blocks_1_0_out_layers_3", "down_blocks.0.resnets.0.conv2", "IN01", ROLE_RESNET),
        ("input_blocks_1_0_emb_layers_1", "down_blocks.0.resnets.0.time_emb_proj", "IN01", ROLE_RESNET),
        ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut", "IN04", ROLE_RESNET),
        ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv", "IN03", ROLE_RESNET),
        ("input_blocks_6_0_op", "down_blocks.1.downsamplers.0.conv", "IN06", ROLE_RESNET),
    ],
)
def test_sdxl_exact_compvis_names(sdxl, name, module, block, role):
    targets, unet = sdxl
    target = {t.name: t for t in targets}["lora_unet_" + name]
    assert target.module is unet.get_submodule(module)
    assert (target.block, target.role) == (block, role)


def test_diffusers_maps_every_sdxl_name_to_its_module(sdxl):
    """diffusers 0.31's loader path for kohya files (`lora_state_dict` with the UNet config: SGM blocks → diffusers,
    then its kohya converter, then peft keys) sends every compvis-style UNet name and every text-encoder name of a whole
    real-size SDXL file to the module we train, each module its own weights (no weights here: index tensors)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    targets, unet = sdxl
    tensors = {}
    for index, target in enumerate(targets):
        tensors[f"{target.name}.lora_down.weight"] = torch.tensor([float(index)])
        tensors[f"{target.name}.lora_up.weight"] = torch.tensor([-float(index)])
        tensors[f"{target.name}.alpha"] = torch.tensor(float(index))
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(tensors, unet_config=unet.config)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    peft = convert_unet_state_dict_to_peft(unet_state)
    got = {
        key.removesuffix(".lora_A.weight"): int(value) for key, value in peft.items() if key.endswith(".lora_A.weight")
    }
    paths = {module: path for path, module in unet.named_modules()}
    unet_targets = [(i, t) for i, t in enumerate(targets) if t.name.startswith("lora_unet_")]
    assert got == {paths[t.module]: i for i, t in unet_targets}
    assert all(int(peft[f"{paths[t.module]}.lora_B.weight"]) == -i for i, t in unet_targets)
    # alphas keep diffusers' intermediate names (…attn1.processor.to_q_lora.down.weight.alpha): all of them carried
    assert sorted(v for k, v in alphas.items() if k.startswith("unet.")) == [i for i, _ in unet_targets]
    text = {k for k in state if k.startswith("text_encoder")}
    assert len(text) == 2 * sum(t.role == ROLE_TEXT for t in targets)


def test_flattened_text_encoder_names_are_normalised():
    """transformers 5 drops the `text_model.` level of CLIPTextModel: the kohya names must not change."""
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2))
    nested = collect_targets(nn.Module(), [("lora_te", te)], 2)
    flat = collect_targets(nn.Module(), [("lora_te", te.text_model)], 2)
    assert [t.name for t in flat] == [t.name for t in nested]
    assert len(flat) == 12
    assert all(a.module is b.module for a, b in zip(flat, nested))


@pytest.mark.parametrize(
    ("name", "layers", "block"),
    [
        ("down_blocks.0.attentions.1.proj_in", 2, "IN02"),
        ("down_blocks.1.downsamplers.0.conv", 2, "IN06"),
        ("down_blocks.3.resnets.0.conv1", 2, "IN10"),
        ("mid_block.resnets.1.conv2", 2, "M00"),
        ("up_blocks.0.resnets.0.conv1", 2, "OUT00"),
        ("up_blocks.2.attentions.2.proj_out", 2, "OUT08"),
        ("up_blocks.3.attentions.2.proj_out", 2, "OUT11"),
        ("up_blocks.0.upsamplers.0.conv", 2, "OUT02"),
        ("down_blocks.0.downsamplers.0.conv", 1, "IN02"),
        ("down_blocks.1.resnets.0.conv1", 1, "IN03"),
        ("up_blocks.1.attentions.1.proj_in", 1, "OUT03"),
        ("up_blocks.0.upsamplers.0.conv", 1, "OUT01"),
        ("down_blocks.1.attentions.2.proj_in", 3, "IN07"),
        ("conv_in", 2, None),
        ("time_embedding.linear_1", 2, None),
        ("add_embedding.linear_1", 2, None),
    ],
)
def test_unet_block_of(name, layers, block):
    assert unet_block_of(name, layers) == block
