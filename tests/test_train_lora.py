"""LoRA mode end to end on the tiny SD1 model: the loss falls, the file is a real kohya LoRA, runs are reproducible."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")


def train(tmp: Path, config, kind: str = "sd1"):
    return run_training(RunContext(config, build_tiny(kind), dirs_in(tmp)))


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    config = dataclasses.replace(demo_config(images, iterations=60), train_learning_rate=1e-2, save_precision="fp32")
    return tmp, config, train(tmp, config)


def test_loss_falls_clearly(trained) -> None:
    _, _, result = trained
    assert result.steps == 60 and len(result.losses) == 60
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.75 * first, f"loss should fall clearly: first {first:.4f}, last {last:.4f}"


def test_saved_file_is_a_kohya_lora(trained) -> None:
    tmp, config, result = trained
    assert result.path == (tmp / "Lora" / "demo.safetensors").resolve()
    with safe_open(str(result.path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys and all(KOHYA_KEY.match(k) for k in keys), [k for k in keys if not KOHYA_KEY.match(k)][:5]
    modules = {k.split(".")[0] for k in keys}
    assert any(m.startswith("lora_te_") for m in modules) and any(m.startswith("lora_unet_") for m in modules)
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        assert down.shape[0] == config.network_rank and up.shape[1] == config.network_rank
        assert float(tensors[f"{module}.alpha"]) == config.network_alpha
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "demo"
    assert "demo style" in metadata["ss_tag_frequency"]
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_up" in k), "lora_up must have been trained"


def test_csv_log_written(trained) -> None:
    tmp, _, _ = trained
    logs = list((tmp / "logs").glob("*/demo-*.csv"))
    assert len(logs) == 1 and logs[0].parent.name.isdigit() and len(logs[0].parent.name) == 8  # logs/<YYYYMMDD>/
    lines = logs[0].read_text().splitlines()
    assert lines[8].startswith("Step,Loss,Learning Rate") and lines[8].endswith(",Raw Loss") and len(lines) == 9 + 60
    assert [int(line.split(",")[0]) for line in lines[9:]] == list(range(1, 61))  # steps counted from 1


def test_same_seed_same_loss_curve(images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, iterations=6), logging_save_csv=False)
    a = train(tmp_path / "a", config)
    b = train(tmp_path / "b", config)
    assert a.losses == b.losses
    c = train(tmp_path / "c", dataclasses.replace(config, train_seed=1))
    assert c.losses != a.losses


def test_diffusers_pipeline_loads_the_lora_and_changes_output(trained) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from traintrain.models.tiny import build_tiny_components

    _, _, result = trained
    c = build_tiny_components("sd1")
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("demo style, a red circle", num_inference_steps=2, height=64, width=64, generator=generator,
                    output_type="latent").images

    before = run()
    pipe.load_lora_weights(str(result.path.parent), weight_name=result.path.name)
    after = run()
    assert len(pipe.get_active_adapters()) == 1
    with safe_open(str(result.path), framework="pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    wrapped = [n for part in (pipe.unet, pipe.text_encoder) for n, m in part.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len(modules), "every module of the file is applied by diffusers"
    assert not torch.allclose(before, after, atol=1e-4), "the LoRA must change the pipeline's output"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora_data_directory": "/nonexistent/folder"}, "not a folder"),
        ({"network_rank": 0}, "rank"),
        ({"train_optimizer": "nosuchopt"}, "optimizer"),
        ({"train_lora_precision": "fp16", "train_model_precision": "fp16"}, "fp16 LoRA weights cannot train"),
        ({"clip_skip": 0}, "clip skip"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(images, tmp_path, change, message) -> None:
    config = dataclasses.replace(demo_config(images, iterations=2), **change)
    with pytest.raises(TrainTrainError, match=re.compile(message, re.I)):
        train(tmp_path, config)
    assert not (tmp_path / "Lora").exists() or not list((tmp_path / "Lora").iterdir())


def test_empty_folder_is_a_clear_error(images, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(TrainTrainError, match="image"):
        train(tmp_path, dataclasses.replace(demo_config(empty, iterations=2)))


def test_corrupt_image_is_skipped_and_training_goes_on(images, tmp_path, caplog) -> None:
    data = write_sample_images(tmp_path / "data")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    result = train(tmp_path, dataclasses.replace(demo_config(data, iterations=2), logging_save_csv=False))
    assert result.path is not None and result.path.exists()


def test_existing_file_not_overwritten_without_setting(images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, iterations=2), save_overwrite=False, logging_save_csv=False)
    first = train(tmp_path, config)
    stamp = first.path.stat().st_mtime_ns
    with pytest.raises(TrainTrainError, match="already exists"):
        train(tmp_path, config)
    assert first.path.stat().st_mtime_ns == stamp


def test_a_run_sets_vae_precision_and_clip_skip_and_restores_them(images, tmp_path, monkeypatch) -> None:
    import traintrain.modes.common as common
    from traintrain.models.bundle import placement
    from traintrain.precision import precision_dtype

    monkeypatch.setattr(common, "weight_dtype", lambda name, device: precision_dtype(name))  # as on a GPU
    bundle = build_tiny("sd1")
    bundle.clip_skip = 2  # the host's own setting (the WebUI's Clip skip)
    seen = []

    def record(progress) -> None:
        seen.append((bundle.clip_skip, bundle.vae_dtype, placement(bundle.components.vae)[1]))

    config = dataclasses.replace(demo_config(images, iterations=1), train_VAE_precision="bf16")
    run_training(RunContext(config, bundle, dirs_in(tmp_path / "a"), progress=record))
    assert seen == [(2, torch.bfloat16, torch.bfloat16)], "the host's clip skip is kept when the setting is 1"
    assert (bundle.clip_skip, bundle.vae_dtype, placement(bundle.components.vae)[1]) == (2, torch.float32, torch.float32)
    seen.clear()
    config = dataclasses.replace(config, clip_skip=3, save_lora_name="again")
    run_training(RunContext(config, bundle, dirs_in(tmp_path / "b"), progress=record))
    assert seen[0][0] == 3 and bundle.clip_skip == 2


def test_nan_latents_are_refused_naming_the_vae_precision(images, tmp_path, monkeypatch) -> None:
    bundle = build_tiny("sd1")
    monkeypatch.setattr(bundle, "encode_images", lambda pixels: torch.full((len(pixels), 4, 8, 8), float("nan")))
    with pytest.raises(TrainTrainError, match="train VAE precision"):
        run_training(RunContext(demo_config(images, iterations=2), bundle, dirs_in(tmp_path)))


def test_sdxl_steps_see_each_images_own_size_and_crop(tmp_path, monkeypatch) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (97, 64), (200, 30, 30)).save(folder / "wide.png")  # 64x64 bucket: cropped 16 px from the left
    bundle = build_tiny("sdxl")
    seen = []
    real = bundle.predict

    def spy(noisy, timesteps, cond, sizes=None):
        seen.append(sizes)
        return real(noisy, timesteps, cond, sizes)

    monkeypatch.setattr(bundle, "predict", spy)
    config = dataclasses.replace(demo_config(folder, iterations=1), train_batch_size=1)
    run_training(RunContext(config, bundle, dirs_in(tmp_path)))
    assert seen[0].tolist() == [[64.0, 97.0, 0.0, 16.0, 64.0, 64.0]]
