"""LoRA files in the forms other tools (and the original TrainTrain) wrote: SDXL with diffusers-style UNet names, SD1
with compvis-style names, `.pt` state dicts, LoHa in the older 4-D conv layout; and the metadata kohya tools read."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.ldm_convert import unet_ldm_namer
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.networks.key_styles import compvis_name
from traintrain.networks.kohya_io import network_from_file, read_network_file, save_network
from traintrain.networks.network import Network, NetworkSpec

CONFIGS = Path(__file__).resolve().parents[1] / "traintrain" / "models" / "configs"
BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def styles(unet: nn.Module) -> dict[str, str]:
    """compvis-style kohya name → diffusers-style kohya name of every UNet Linear / Conv2d in the blocks, by the
    project's state-dict converter (an independent derivation from `key_styles`' arithmetic)."""
    namer = unet_ldm_namer(unet.config)
    return {
        kohya(namer(name)): kohya(name)
        for name, module in unet.named_modules()
        if name.startswith(BLOCKS) and isinstance(module, (nn.Linear, nn.Conv2d))
    }


def renamed(tensors: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        out[f"{names.get(module, module)}.{part}"] = tensor
    return out


def trained_like(bundle, network_type: str = "c3lier", seed: int = 1) -> Network:
    """A network with random (non-zero) weights everywhere, so a wrong mapping shows in the values."""
    torch.manual_seed(seed)
    network = Network.build(NetworkSpec(network_type, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0), bundle.lora_targets())
    with torch.no_grad():
        for param in network.parameters():
            param.normal_()
    return network


def adapter_state(network: Network) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, a in network.adapters.items() for k, v in a.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_real_size_layouts_translate_like_the_state_dict_converter(kind: str) -> None:
    """On the real SD1.5 / SDXL UNet (meta device), every diffusers-style name maps to kohya's compvis name."""
    config = json.loads((CONFIGS / {"sd1": "sd15", "sdxl": "sdxl"}[kind] / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    pairs = styles(unet)
    assert len(pairs) > {"sd1": 250, "sdxl": 700}[kind]
    slot = {v: 2 if "upsamplers" in v and "_1_conv" not in k else 1 for k, v in pairs.items()}
    for compvis, diffusers in pairs.items():
        assert compvis_name(diffusers, 2, slot[diffusers]) == compvis, diffusers


def test_sdxl_lora_with_diffusers_style_names_resumes(tmp_path: Path) -> None:
    """An SDXL LoRA as the original wrote it (`lora_unet_down_blocks_…`) loads with every weight in its place,
    trains on, and is saved again in kohya's compvis style."""
    bundle = build_tiny("sdxl")
    network = trained_like(bundle)
    save_network(tmp_path / "compvis.safetensors", network, {}, torch.float32, 1.0)
    tensors = load_file(tmp_path / "compvis.safetensors")
    names = styles(bundle.components.unet)
    old_style = renamed(tensors, names)
    assert sum(key.startswith("lora_unet_down_blocks_") for key in old_style) > 10
    save_file(old_style, tmp_path / "original.safetensors")
    loaded = network_from_file(tmp_path / "original.safetensors", bundle.lora_targets())
    assert set(loaded.adapters) == set(network.adapters)
    expected = adapter_state(network)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(loaded).items())

    images = write_sample_images(tmp_path / "images")
    config = dataclasses.replace(
        demo_config(images, iterations=2), network_resume=str(tmp_path / "original.safetensors"), save_lora_name="again"
    )
    result = run_training(RunContext(config, bundle, OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "j")))
    saved, _ = read_network_file(result.path)
    assert {key.split(".")[0] for key in saved} == set(network.adapters)  # written compvis-style again


def test_sd1_lora_with_compvis_style_names_loads(tmp_path: Path) -> None:
    bundle = build_tiny("sd1")
    network = trained_like(bundle, "lierla")
    save_network(tmp_path / "a.safetensors", network, {}, torch.float32, 1.0)
    to_compvis = {diffusers: compvis for compvis, diffusers in styles(bundle.components.unet).items()}
    save_file(renamed(load_file(tmp_path / "a.safetensors"), to_compvis), tmp_path / "b.safetensors")
    assert any(key.startswith("lora_unet_input_blocks_") for key in load_file(tmp_path / "b.safetensors"))
    loaded = network_from_file(tmp_path / "b.safetensors", bundle.lora_targets())
    expected = adapter_state(network)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(loaded).items())


def test_pt_lora_resumes_and_pickles_are_refused(tmp_path: Path) -> None:
    bundle = build_tiny("sd1")
    network = trained_like(bundle, "lierla")
    save_network(tmp_path / "a.safetensors", network, {}, torch.float32, 1.0)
    torch.save(load_file(tmp_path / "a.safetensors"), tmp_path / "a.pt")
    loaded = network_from_file(tmp_path / "a.pt", bundle.lora_targets())
    expected = adapter_state(network)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(loaded).items())
    torch.save({"weights": Path("not-a-tensor")}, tmp_path / "evil.pt")  # a class weights_only never builds
    with pytest.raises(TrainTrainError, match="not a readable .pt LoRA"):
        read_network_file(tmp_path / "evil.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(TrainTrainError, match="no LoRA state dict"):
        read_network_file(tmp_path / "list.pt")


def test_loha_conv_saved_flat_and_the_older_4d_layout_still_loads(tmp_path: Path) -> None:
    bundle = build_tiny("sd1")
    network = trained_like(bundle, "loha")
    save_network(tmp_path / "flat.safetensors", network, {}, torch.float32, 1.0)
    flat = load_file(tmp_path / "flat.safetensors")
    convs = [n for n, a in network.adapters.items() if a.is_conv and a.kernel != (1, 1)]
    assert convs and all(flat[f"{n}.hada_w1_b"].dim() == 2 == flat[f"{n}.hada_w2_b"].dim() for n in convs)
    old = dict(flat)
    for name in convs:
        adapter = network.adapters[name]
        for key in ("hada_w1_b", "hada_w2_b"):
            old[f"{name}.{key}"] = flat[f"{name}.{key}"].reshape(adapter.rank, adapter.in_dim, *adapter.kernel)
    save_file(old, tmp_path / "old.safetensors")
    loaded = network_from_file(tmp_path / "old.safetensors", bundle.lora_targets())
    expected = adapter_state(network)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(loaded).items())


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp("meta")
    images = write_sample_images(tmp / "images")
    config = dataclasses.replace(
        demo_config(images, iterations=3), train_optimizer_settings={"weight_decay": 0.01}, image_num_multiply=2,
        train_snr_gamma=5.0
    )
    result = run_training(RunContext(config, build_tiny("sd2"), OutputDirs(tmp / "Lora", tmp / "logs", tmp / "j")))
    return result.path, read_network_file(result.path)[1], images


def test_metadata_has_the_kohya_keys_lora_cards_read(trained_file) -> None:
    path, meta, images = trained_file
    count = len([p for p in images.iterdir() if p.suffix == ".png"])
    assert meta["ss_num_train_images"] == str(2 * count) and meta["ss_num_reg_images"] == "0"
    assert json.loads(meta["ss_dataset_dirs"]) == {images.name: {"n_repeats": 2, "img_count": count}}
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_batch_size_per_device"] == "2"
    steps_per_epoch = -(-2 * count // 2)
    assert meta["ss_num_epochs"] == str(-(-3 // steps_per_epoch)) and meta["ss_epoch"] == meta["ss_num_epochs"]
    assert meta["ss_optimizer"] == "AdamW(weight_decay=0.01)" and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_clip_skip"] == "1" and meta["ss_noise_offset"] == "None"
    assert meta["ss_caption_dropout_rate"] == "0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"  # the tiny SD2 is v-prediction


@pytest.mark.parametrize("v_prediction, expected", [(False, "stable-diffusion-v2-512"), (True, "stable-diffusion-v2-768-v")])
def test_sd2_architecture_follows_the_prediction(v_prediction: bool, expected: str) -> None:
    """SD2-base (epsilon, 512) is not the 768-v model."""
    from traintrain.networks.kohya_io import training_metadata

    meta = training_metadata(
        output_name="x", network_type="lierla", rank=4, alpha=1.0, conv_rank=0, conv_alpha=0.0,
        base_model_version="sd_v2", v_prediction=v_prediction, settings={}, tag_frequency={}, started_at=0.0, steps=1,
    )  # fmt: skip
    assert meta["modelspec.architecture"] == f"{expected}/lora"


def test_sshs_hashes_match_the_file(trained_file) -> None:
    """`sshs_model_hash` is the sha256 of the tensor bytes after the header (the WebUI's addnet hash)."""
    path, meta, _ = trained_file
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()
    padded = data + b"\0" * max(0, 0x110000 - len(data))
    assert len(meta["sshs_legacy_hash"]) == 8 and (
        len(data) < 0x100000 and meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
        or meta["sshs_legacy_hash"] == hashlib.sha256(padded[0x100000:0x110000]).hexdigest()[:8]
    )


def test_base_model_name_and_hash(tmp_path: Path) -> None:
    from traintrain.modes.metadata import kohya_settings

    model = tmp_path / "v1-5-pruned.safetensors"
    model.write_bytes(bytes(range(256)) * 0x2000)  # 2 MiB
    config = dataclasses.replace(demo_config(tmp_path, iterations=1), model=str(model))
    facts = kohya_settings(config, images=1, steps=1)
    assert facts["sd_model_name"] == "v1-5-pruned.safetensors"
    assert facts["sd_model_hash"] == hashlib.sha256(model.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    titled = kohya_settings(dataclasses.replace(config, model="sub/x.safetensors [6ce0161689]"), images=1, steps=1)
    assert titled["sd_model_name"] == "x.safetensors" and "sd_model_hash" not in titled


def test_diff_load_1st_pass_finds_pt_files(tmp_path: Path) -> None:
    from traintrain.modes.difference import find_first_pass_file

    (tmp_path / "Lora" / "sub").mkdir(parents=True)
    (tmp_path / "Lora" / "sub" / "copier.pt").write_bytes(b"")
    ctx = RunContext(demo_config(tmp_path, 1), build_tiny("sd1"), OutputDirs(tmp_path / "Lora", tmp_path, tmp_path))
    assert find_first_pass_file(ctx, "copier") == tmp_path / "Lora" / "sub" / "copier.pt"
    assert find_first_pass_file(ctx, "copier.pt") == tmp_path / "Lora" / "sub" / "copier.pt"
