"""LoRA target discovery on real-size SD1.5 / SDXL architectures built on the meta device (no memory, no weights)."""

from collections import Counter

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.models.bundle import ROLE_CROSS_ATTN, ROLE_RESNET, ROLE_SELF_ATTN, ROLE_TEXT, ROLE_TRANSFORMER
from trainer.models.targets import collect_targets, unet_block_of

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
    return collect_targets(unet, [("lora_te", te)], layers_per_block=2), unet, te


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
    return collect_targets(unet, [("lora_te1", te1), ("lora_te2", te2)], layers_per_block=2)


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
    lierla = [t for t in sdxl if t.role in LIERLA_ROLES]
    assert len(lierla) == 722
    text = Counter(t.name.split("_text_model_")[0] for t in sdxl if t.role == ROLE_TEXT)
    assert text == {"lora_te1": 72, "lora_te2": 192}
    assert {t.block for t in lierla} == {"IN04", "IN05", "IN07", "IN08", "M00"} | blocks("OUT", range(6))
    assert {t.block for t in sdxl} == {"BASE", "M00"} | blocks("IN", range(1, 9)) | blocks("OUT", range(9))
    names = {t.name for t in sdxl}
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_v" in names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in names
    assert not any("text_projection" in name for name in names)


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
