"""The Forge / Forge Neo host against stand-ins of Forge's APIs (`forge_fakes`): a job trains a copy loaded from the
checkpoint file under Forge's lock after Forge freed its model, saves a LoRA with the right base-model version,
leaves Forge's engine and its inference-tensor weights bit-identical, stops on Forge's Interrupt with a save, and
refuses what it cannot train with a message saying what to change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from forge_fakes import (
    PATCHED_KEY,
    FakeForge,
    Flux,
    StableDiffusion,
    StableDiffusion2,
    StableDiffusionXL,
    engine_tensors,
    forge_engine,
)
from safetensors import safe_open
from safetensors.torch import save_file

from traintrain import hosts
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.hosts.forge import ForgeModelProvider
from traintrain.hosts.forge_files import config_folder
from traintrain.models import checkpoint
from traintrain.models.bundle import BASE_MODEL_VERSION
from traintrain.models.ldm_convert import VAE_PREFIX, save_single_file, vae_state_dict_to_ldm
from traintrain.models.tiny import build_tiny_components, save_tiny_pipeline
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.previews import preview_requests
from traintrain.progress import StopFlag

ENGINES = {"sd1": StableDiffusion, "sd2": StableDiffusion2, "sdxl": StableDiffusionXL}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Per kind: the tiny checkpoint as an A1111-style single file, its diffusers config folder beside it."""
    root = tmp_path_factory.mktemp("forge-models") / "Stable-diffusion"
    out = {}
    for kind in ENGINES:
        out[kind] = save_single_file(build_tiny_components(kind, seed=0), root / f"tiny-{kind}.safetensors")
        save_tiny_pipeline(kind, root / f"tiny-{kind}")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def forge_for(monkeypatch, tmp_path: Path, checkpoint_file: Path, kind: str = "sd1", neo: bool = True) -> FakeForge:
    return FakeForge(monkeypatch, forge_engine(checkpoint_file, ENGINES[kind]), tmp_path, neo=neo)


def provider_for(on_interrupt=None) -> ForgeModelProvider:
    return ForgeModelProvider(on_interrupt)


def config_for(images: Path, **changes):
    return dataclasses.replace(demo_config(images, iterations=3), **changes)


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_a_job_trains_a_copy_from_the_file_and_leaves_forges_model_as_it_was(
    files, images, tmp_path, monkeypatch, kind
) -> None:
    fake = forge_for(monkeypatch, tmp_path, files[kind], kind)
    clean = {key: value.clone() for key, value in engine_tensors(fake.engine).items()}
    fake.engine.forge_objects.unet.merge_lora(PATCHED_KEY, 0.25)  # a generation with <lora:…> merged it
    reads = []
    read_state_dict = checkpoint.read_state_dict
    monkeypatch.setattr(
        checkpoint, "read_state_dict", lambda path: reads.append(fake.calls[:]) or read_state_dict(path)
    )
    held = []
    with provider_for().open(config_for(images)) as bundle:
        assert not hasattr(bundle, "sd_model") and bundle.kind == kind
        assert fake.state.job == "TrainTrain"
        result = run_training(
            RunContext(
                config_for(images), bundle, dirs_in(tmp_path), progress=lambda _: held.append(fake.locked_elsewhere())
            )
        )
    assert result.steps == 3 and held == [True, True, True] and not fake.locked_elsewhere()
    assert reads == [[("unload_all_models",), ("soft_empty_cache",)]], "Forge frees its model before the file is read"
    assert fake.calls[2:] == [("soft_empty_cache",), ("list_available_networks",)]
    with safe_open(str(result.path), framework="pt") as saved:
        assert saved.metadata()["ss_base_model_version"] == BASE_MODEL_VERSION[kind]
    assert all(p.device.type == "meta" for p in bundle.components.unet.parameters()), "our copy left the device"
    after = engine_tensors(fake.engine)
    assert after.keys() == clean.keys() and all(torch.equal(after[k], clean[k]) for k in clean)
    assert all(value.is_inference() for value in after.values())
    assert fake.shared.sd_model is fake.engine and fake.model_data.sd_model is fake.engine
    assert fake.model_data.forge_hash.startswith("{") and fake.state.job == ""


def test_the_trained_copy_is_the_checkpoints_own_weights(files, images, tmp_path, monkeypatch) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    expected = build_tiny_components("sd1", seed=0)
    with provider_for().open(config_for(images)) as bundle:
        unet = bundle.components.unet.state_dict()
        assert all(torch.equal(unet[k], v) for k, v in expected.unet.state_dict().items())
        assert all(not p.is_inference() for p in bundle.components.unet.parameters())
    assert ("list_available_networks",) in fake.calls


def test_forges_interrupt_stops_the_training_with_a_save(files, images, tmp_path, monkeypatch) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"], neo=False)
    stop = StopFlag()
    config = config_for(images, train_iterations=5000)

    def press_interrupt(progress) -> None:
        if progress.step == 2:
            fake.state.interrupted = True

    with provider_for(on_interrupt=lambda: stop.request(save=True)).open(config) as bundle:
        result = run_training(RunContext(config, bundle, dirs_in(tmp_path), progress=press_interrupt, stop=stop))
    assert result.stopped and result.steps < 5000 and result.path.name.startswith("demo-step")
    assert fake.state.job == "" and not fake.locked_elsewhere()


def test_the_vae_of_forges_module_choice_or_the_picked_one_is_used(files, images, tmp_path, monkeypatch) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    other = build_tiny_components("sd1", seed=1).vae
    vae_path = tmp_path / "VAE" / "other.safetensors"
    vae_path.parent.mkdir()
    ldm = vae_state_dict_to_ldm(other.state_dict(), len(other.config["up_block_types"]))
    save_file({VAE_PREFIX + k: v.contiguous() for k, v in ldm.items()}, str(vae_path))
    fake.shared.opts.forge_additional_modules = [str(vae_path)]
    expected = other.state_dict()
    with provider_for().open(config_for(images)) as bundle:
        assert all(torch.equal(bundle.components.vae.state_dict()[k], v) for k, v in expected.items())
    fake.shared.opts.forge_additional_modules = []
    fake.sd_vae.vae_dict["other.safetensors"] = str(vae_path)  # picked in TrainTrain's VAE list
    with provider_for().open(config_for(images, vae="other.safetensors")) as bundle:
        assert all(torch.equal(bundle.components.vae.state_dict()[k], v) for k, v in expected.items())


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_what_cannot_be_trained_is_refused_before_forge_is_touched(files, images, tmp_path, monkeypatch) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    gguf = tmp_path / "flux-q4.gguf"
    gguf.write_bytes(b"GGUF")
    fp8 = write_file(
        tmp_path / "fp8.safetensors", {"model.diffusion_model.x.weight": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    )
    nf4 = write_file(tmp_path / "nf4.safetensors", {"model.diffusion_model.x.weight.absmax": torch.zeros(2)})
    flux = write_file(
        tmp_path / "flux.safetensors", {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}
    )
    for path in (gguf, fp8, nf4, flux):
        fake.checkpoints[path.name] = type(fake.engine.sd_checkpoint_info)(filename=str(path))
    cases = {
        gguf.name: "is a GGUF file",
        fp8.name: "pre-quantized fp8 weights",
        nf4.name: "pre-quantized nf4 / fp4",
        flux.name: "Forge has a Flux model loaded",
        "missing [0000]": "is not in the WebUI's list",
    }
    for name, message in cases.items():
        with pytest.raises(TrainTrainError, match=message):
            with provider_for().open(config_for(images, model=name)):
                pass
    text_encoder = write_file(tmp_path / "t5xxl.safetensors", {"encoder.block.0.layer.0.weight": torch.zeros(2)})
    fake.shared.opts.forge_additional_modules = [str(text_encoder)]
    with pytest.raises(TrainTrainError, match="t5xxl.safetensors, which is not a VAE"):
        with provider_for().open(config_for(images)):
            pass
    fake.shared.opts.forge_additional_modules = []
    fake.shared.sd_model = Flux(fake.engine.forge_objects, fake.engine.sd_checkpoint_info)
    with pytest.raises(TrainTrainError, match="Forge has a Flux model loaded: TrainTrain trains SD1, SD2 and SDXL"):
        with provider_for().open(config_for(images)):
            pass
    assert ("unload_all_models",) not in fake.calls
    assert fake.calls.count(("list_available_networks",)) == 7 and not fake.locked_elsewhere()


def test_before_the_first_generation_the_checkpoint_forge_will_load_is_trained(
    files, images, tmp_path, monkeypatch
) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sdxl"], "sdxl")
    fake.shared.sd_model = fake.model_data.sd_model = type("FakeInitialModel", (), {})()
    fake.model_data.forge_loading_parameters = {}  # nothing built yet: Forge's default pick (select_checkpoint)
    with provider_for().open(config_for(images)) as bundle:
        assert bundle.kind == "sdxl"


def test_without_any_checkpoint_the_job_is_refused(files, images, tmp_path, monkeypatch) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    fake.shared.sd_model = fake.model_data.sd_model = type("FakeInitialModel", (), {})()
    fake.model_data.forge_loading_parameters = {}
    monkeypatch.setattr(fake.sd_models, "select_checkpoint", lambda: None)
    with pytest.raises(TrainTrainError, match="Forge has no checkpoint selected"):
        with provider_for().open(config_for(images)):
            pass
    assert ("unload_all_models",) not in fake.calls and not fake.locked_elsewhere()


def test_a_checkpoint_picked_in_forges_dropdown_is_trained_before_forge_loads_it(
    files, images, tmp_path, monkeypatch
) -> None:
    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    picked = type(fake.engine.sd_checkpoint_info)(filename=str(files["sdxl"]))
    fake.model_data.forge_loading_parameters = {"checkpoint_info": picked, "additional_modules": []}
    with provider_for().open(config_for(images)) as bundle:
        assert bundle.kind == "sdxl"
    assert fake.shared.sd_model is fake.engine and ("forge_model_reload",) not in fake.calls


def test_previews_go_through_forges_txt2img_under_its_lock(files, tmp_path, monkeypatch) -> None:
    from traintrain.config import TrainConfig

    fake = forge_for(monkeypatch, tmp_path, files["sd1"])
    config = TrainConfig(mode="iLECO", original_prompt="a cat", target_prompt="a dog", image_size=(64, 64))
    drawn = provider_for().preview(config, preview_requests(config, "all", seed=3))
    assert len(drawn) == 2
    assert [c for c in fake.calls if c[0] == "process_images"] == [
        ("process_images", p, True, True) for p in ("a cat", "a dog")
    ]
    with fake.queue_lock, pytest.raises(TrainTrainError, match="busy"):
        provider_for().preview(config, preview_requests(config, "original"))


def test_the_host_interface_on_forge(files, tmp_path, monkeypatch) -> None:
    forge_for(monkeypatch, tmp_path, files["sd1"])
    host = hosts.detect_host()
    assert host.name == "Forge Neo" and isinstance(host.provider(), ForgeModelProvider)
    assert host.lora_dir() == tmp_path / "Lora"
    assert host.model_choices() == ["", "tiny-sd1.safetensors [abcd]"] and host.vae_choices() == [""]


def test_a_config_folder_beside_the_checkpoint_is_used_else_the_shipped_one(files, tmp_path) -> None:
    assert config_folder(files["sdxl"]) == files["sdxl"].with_suffix("")
    lone = tmp_path / "real-size.safetensors"
    (tmp_path / "real-size").mkdir()  # a folder without unet/config.json is not a config folder
    assert config_folder(lone) is None
