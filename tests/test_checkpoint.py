"""Single-file checkpoints offline: LDM conversion round trips bit-identically, kind detection, VAE files, errors,
LDM ↔ diffusers module names, and the shipped real-size configs."""

from __future__ import annotations

import shutil
from pathlib import PurePosixPath

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from traintrain.errors import TrainTrainError
from traintrain.models.checkpoint import components_from_ldm, detect_kind, load_checkpoint, shipped_config_dir
from traintrain.models.diffusers_backend import Components, ddpm_alphas_cumprod
from traintrain.models.ldm_convert import (
    TEXT_ENCODER_SLOTS,
    ldm_state_dict,
    save_single_file,
    text_encoder_ldm_to_diffusers_names,
    unet_ldm_to_diffusers_names,
    unet_state_dict_to_ldm,
    vae_state_dict_to_ldm,
)
from traintrain.models.tiny import build_tiny_components, save_tiny_pipeline

KINDS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
    """Per kind: the tiny components (seed 0), their single file, and the same model as a diffusers folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind in KINDS:
        components = build_tiny_components(kind, seed=0)
        out[kind] = (components, save_single_file(components, root / f"{kind}.safetensors"), root / kind)
        save_tiny_pipeline(kind, root / kind, seed=0)
    return out


def assert_identical(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    """Every tensor equal bit for bit, under the same names."""
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    different = [key for key in want if not torch.equal(want[key], got[key])]
    assert different == []


def module_names(module: torch.nn.Module, *types: type) -> set[str]:
    return {name for name, m in module.named_modules() if isinstance(m, types)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def real_size_on_meta(kind: str) -> Components:
    """The real model of `kind` built from its shipped config on the meta device (no memory, no weights)."""
    folder = shipped_config_dir(kind)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))]
        if kind == "sdxl":
            config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            encoders.append(CLIPTextModelWithProjection(config))
    return Components(unet, vae, encoders, [], kind, "epsilon", ddpm_alphas_cumprod())


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_round_trip_is_bit_identical(models, kind):
    components, path, folder = models[kind]
    loaded = load_checkpoint(path, config_dir=folder)
    assert (loaded.kind, loaded.prediction) == (kind, components.prediction)
    assert_identical(components.unet, loaded.unet)
    assert_identical(components.vae, loaded.vae)
    assert len(loaded.text_encoders) == len(components.text_encoders) == len(loaded.tokenizers)
    for original, encoder in zip(components.text_encoders, loaded.text_encoders):
        assert type(encoder) is type(original)
        assert_identical(original, encoder)
    assert torch.allclose(loaded.alphas_cumprod, ddpm_alphas_cumprod())


def test_file_layouts_and_detect_kind(models):
    files = {kind: load_file(str(models[kind][1])) for kind in KINDS}
    assert detect_kind(files["sd1"]) == ("sd1", None)
    assert detect_kind(files["sd2"]) == ("sd2", "v")  # save_single_file marks v-prediction with a v_pred key
    assert detect_kind(files["sdxl"]) == ("sdxl", None)
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in files["sd1"]
    fused = files["sd2"]["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert tuple(fused.shape) == (3 * 48, 48)
    te2 = models["sdxl"][0].text_encoders[1]
    projection = files["sdxl"]["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(projection, te2.text_projection.weight.T)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in files["sdxl"]
    assert "model.diffusion_model.label_emb.0.0.weight" in files["sdxl"]


def test_detect_kind_from_real_shapes():
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_kind({to_k: (320, 768)}) == ("sd1", None)
    assert detect_kind({to_k: (320, 1024), "v_pred": (0,)}) == ("sd2", "v")
    assert detect_kind({to_k: (320, 2048), "conditioner.embedders.1.model.positional_embedding": (77, 1280)}) == (
        "sdxl",
        None,
    )
    with pytest.raises(TrainTrainError, match="cross-attention width 2048"):
        detect_kind({to_k: (320, 2048)})


@pytest.mark.parametrize("bias, expected", [(-2.0, "v"), (0.0, "epsilon")])
def test_sd2_files_without_a_v_pred_key_are_told_apart_by_their_weights(models, bias, expected):
    """A v-model answers a flat grey latent at t=999 far below it (mean difference under -1), an ε-model near it:
    here the tiny SD2 UNet's output is pinned to a constant through its last convolution."""
    _, sd2_file, sd2_folder = models["sd2"]
    state = load_file(str(sd2_file))
    state.pop("v_pred", None)
    state["model.diffusion_model.out.2.weight"] = torch.zeros_like(state["model.diffusion_model.out.2.weight"])
    state["model.diffusion_model.out.2.bias"] = torch.full_like(state["model.diffusion_model.out.2.bias"], bias)
    assert components_from_ldm(state, config_dir=sd2_folder).prediction == expected


def test_prediction_setting_overrides(models):
    _, sd2_file, sd2_folder = models["sd2"]
    assert load_checkpoint(sd2_file, config_dir=sd2_folder, v_pred=False).prediction == "epsilon"
    _, sd1_file, sd1_folder = models["sd1"]
    assert load_checkpoint(sd1_file, config_dir=sd1_folder, v_pred=True).prediction == "v"


@pytest.mark.parametrize("prefix", ["first_stage_model.", ""])
def test_separate_vae_file_replaces_the_vae(models, tmp_path, prefix):
    components, path, folder = models["sd1"]
    other = build_tiny_components("sd1", seed=1).vae
    ldm = vae_state_dict_to_ldm(other.state_dict(), len(other.config.up_block_types))
    vae_file = tmp_path / "other.vae.safetensors"
    save_file({prefix + key: value.contiguous() for key, value in ldm.items()}, str(vae_file))
    loaded = load_checkpoint(path, config_dir=folder, vae_path=vae_file)
    assert_identical(other, loaded.vae)
    assert not torch.equal(loaded.vae.encoder.conv_in.weight, components.vae.encoder.conv_in.weight)
    assert_identical(components.unet, loaded.unet)


def test_vae_that_does_not_fit_is_refused(models, tmp_path):
    _, path, folder = models["sd1"]
    ldm = vae_state_dict_to_ldm(build_tiny_components("sd1", seed=1).vae.state_dict(), 4)
    ldm["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)  # another width than the model's 8 channels
    vae_file = tmp_path / "wrong.safetensors"
    save_file({key: value.contiguous() for key, value in ldm.items()}, str(vae_file))
    with pytest.raises(TrainTrainError, match="VAE wrong.safetensors does not fit.*conv_in.weight"):
        load_checkpoint(path, config_dir=folder, vae_path=vae_file)
    with pytest.raises(TrainTrainError, match="does not exist"):
        load_checkpoint(path, config_dir=folder, vae_path=tmp_path / "absent.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_loads(models, kind):
    components, _, folder = models[kind]
    loaded = load_checkpoint(folder)
    assert (loaded.kind, loaded.prediction) == (kind, components.prediction)
    assert_identical(components.unet, loaded.unet)
    for original, encoder in zip(components.text_encoders, loaded.text_encoders, strict=True):
        assert_identical(original, encoder)
    for original, tokenizer in zip(components.tokenizers, loaded.tokenizers, strict=True):
        assert tokenizer("a cat").input_ids == original("a cat").input_ids
        assert tokenizer.pad_token == original.pad_token


def test_broken_diffusers_folder_is_refused(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["sd1"][2], broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(TrainTrainError, match="Cannot load unet from"):
        load_checkpoint(broken)


def test_dtype_casts_the_weights(models):
    components, path, folder = models["sdxl"]
    loaded = load_checkpoint(path, config_dir=folder, dtype=torch.float16)
    assert {p.dtype for m in (loaded.unet, loaded.vae, *loaded.text_encoders) for p in m.parameters()} == {
        torch.float16
    }
    assert torch.equal(loaded.unet.conv_in.weight, components.unet.conv_in.weight.half())


def test_shipped_tokenizer_settings_build_the_real_clip_vocabulary(models, tmp_path, monkeypatch):
    """Without vocab files in the config folder the real CLIP BPE is used, with each folder's pad token."""
    monkeypatch.setenv("TRAINTRAIN_CACHE", str(tmp_path / "cache"))
    _, path, folder = models["sdxl"]
    config = tmp_path / "config"
    shutil.copytree(folder, config)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            (config / sub / name).unlink()
    loaded = load_checkpoint(path, config_dir=config)
    assert [t("a photo of a cat").input_ids for t in loaded.tokenizers] == [
        [49406, 320, 1125, 539, 320, 2368, 49407]
    ] * 2
    assert [t.pad_token_id for t in loaded.tokenizers] == [49407, 0]  # tokenizer_2 pads with "!" like SDXL's


def test_user_errors(models, tmp_path):
    with pytest.raises(TrainTrainError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")
    random_file = tmp_path / "random.safetensors"
    save_file({"foo.weight": torch.randn(4, 4), "bar": torch.zeros(3)}, str(random_file))
    with pytest.raises(TrainTrainError, match="not a SD1.x, SD2.x or SDXL checkpoint.*2 tensors, no UNet"):
        load_checkpoint(random_file)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file" * 8)
    with pytest.raises(TrainTrainError, match="not a readable .safetensors"):
        load_checkpoint(garbage)
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(TrainTrainError, match="unknown model format '.txt'"):
        load_checkpoint(text)
    with pytest.raises(TrainTrainError, match="without model_index.json"):
        load_checkpoint(tmp_path)
    _, sd1_file, _ = models["sd1"]
    with pytest.raises(TrainTrainError, match="UNet weights do not fit"):  # a tiny file against the real SD1.5 config
        load_checkpoint(sd1_file)


def test_ckpt_is_read_with_weights_only(models, tmp_path):
    components, path, folder = models["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 3}, ckpt)
    assert_identical(components.unet, load_checkpoint(ckpt, config_dir=folder).unet)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": load_file(str(path)), "callback": PurePosixPath("/")}, pickled)  # not a tensor type
    with pytest.raises(TrainTrainError, match="cannot be read safely .*Convert it to .safetensors"):
        load_checkpoint(pickled, config_dir=folder)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_unet_module_name_map_covers_every_layer(models, kind):
    components, path, _ = models[kind]
    unet = components.unet
    names = unet_ldm_to_diffusers_names(unet.config)
    layers = module_names(unet, torch.nn.Linear, torch.nn.Conv2d)
    assert layers <= set(names.values())
    assert set(names.values()) <= module_names(unet, torch.nn.Module)
    ldm_modules = {key[len("model.diffusion_model.") :].rsplit(".", 1)[0] for key in load_file(str(path))}
    assert set(names) <= ldm_modules


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_text_encoder_module_name_map(models, kind):
    components, path, _ = models[kind]
    keys = load_file(str(path)).keys()
    for (prefix, layout), encoder in zip(TEXT_ENCODER_SLOTS[kind], components.text_encoders, strict=True):
        names = text_encoder_ldm_to_diffusers_names(layout, encoder.config.num_hidden_layers)
        linears = module_names(encoder, torch.nn.Linear) - {"text_projection"}
        assert linears <= set(names.values()) <= module_names(encoder, torch.nn.Module)
        for ldm in names:
            fused = layout == "openclip" and ldm.endswith(("q_proj", "k_proj", "v_proj"))
            key = ldm.rsplit(".", 1)[0] + ".in_proj_weight" if fused else ldm + ".weight"
            assert prefix + key in keys


def test_real_sd15_and_sdxl_names():
    sd15 = unet_ldm_to_diffusers_names(UNet2DConditionModel.load_config(shipped_config_dir("sd1"), subfolder="unet"))
    assert (
        sd15["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
        == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert sd15["middle_block.1.proj_in"] == "mid_block.attentions.0.proj_in"
    assert sd15["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert (
        sd15["output_blocks.11.1.transformer_blocks.0.ff.net.2"]
        == "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"
    )
    assert sd15["input_blocks.4.0.skip_connection"] == "down_blocks.1.resnets.0.conv_shortcut"
    sdxl = unet_ldm_to_diffusers_names(UNet2DConditionModel.load_config(shipped_config_dir("sdxl"), subfolder="unet"))
    assert sdxl["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert sdxl["label_emb.0.0"] == "add_embedding.linear_1"
    assert (
        sdxl["input_blocks.8.1.transformer_blocks.9.attn2.to_k"]
        == "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
    )
    te2 = text_encoder_ldm_to_diffusers_names("openclip", 32)
    assert te2["model.transformer.resblocks.31.mlp.c_proj"] == "text_model.encoder.layers.31.mlp.fc2"
    assert te2["model.transformer.resblocks.0.attn.out_proj"] == "text_model.encoder.layers.0.self_attn.out_proj"


def test_shipped_configs_build_the_public_models():
    """Real-size modules on the meta device have the public parameter counts; the converter gives the canonical keys."""
    sd15, sdxl = real_size_on_meta("sd1"), real_size_on_meta("sdxl")
    assert count(sd15.vae) == 83_653_863
    assert count(sd15.text_encoders[0].text_model) == 123_060_480
    assert count(sdxl.text_encoders[1]) == 694_659_840
    with init_empty_weights():
        open_clip_h = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped_config_dir("sd2"), subfolder="text_encoder"))
    assert count(open_clip_h) == 340_387_840  # 23 of OpenCLIP-H's 24 layers: SD2 uses the penultimate one
    for components, ldm_keys in ((sd15, 686), (sdxl, 1680)):  # UNet key counts of the real A1111 checkpoints
        unet = components.unet
        ldm = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
        assert len(ldm) == ldm_keys
        back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, unet.config)
        assert back.keys() == unet.state_dict().keys()
    ldm_vae = vae_state_dict_to_ldm(sd15.vae.state_dict(), 4)
    assert len(ldm_vae) == 248
    assert convert_ldm_vae_checkpoint(ldm_vae, sd15.vae.config).keys() == sd15.vae.state_dict().keys()


def test_shipped_schedules():
    loaded = {}
    for kind in KINDS:
        folder = shipped_config_dir(kind)
        assert (folder / "model_index.json").is_file()
        loaded[kind] = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    assert [loaded[k].config.prediction_type for k in KINDS] == ["epsilon", "v_prediction", "epsilon"]
    for scheduler in loaded.values():
        assert torch.allclose(scheduler.alphas_cumprod.float(), ddpm_alphas_cumprod(), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_real_layouts_load_with_the_shipped_configs(kind, tmp_path, monkeypatch):
    """A real-size LDM state dict (meta tensors) loads: every key used, public UNet sizes, real CLIP tokenizers."""
    monkeypatch.setenv("TRAINTRAIN_CACHE", str(tmp_path))
    state = ldm_state_dict(real_size_on_meta(kind))
    if kind == "sd2":  # real SD2 files hold OpenCLIP-H's 24th layer, which SD2 (penultimate layer) does not use
        state.update({k.replace(".22.", ".23."): v for k, v in state.items() if ".resblocks.22." in k})
    components = components_from_ldm(state)
    assert state == {}
    assert (components.kind, components.prediction) == (kind, "v" if kind == "sd2" else "epsilon")
    widths = {"sd1": [768], "sd2": [1024], "sdxl": [768, 1280]}[kind]
    assert [encoder.config.hidden_size for encoder in components.text_encoders] == widths
    pads = {"sd1": [49407], "sd2": [0], "sdxl": [49407, 0]}[kind]
    assert [tokenizer.pad_token_id for tokenizer in components.tokenizers] == pads
    assert count(components.unet) == {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}[kind]
