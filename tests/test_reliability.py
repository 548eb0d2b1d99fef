"""Bad input, interruption and faults never lose work: clear messages, no partial files, the last good save kept."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import traintrain.networks.kohya_io as kohya_io
from traintrain.config import FIELDS, TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.preflight import settings_problems
from traintrain.progress import StopFlag


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(tmp / "Lora", tmp / "logs", tmp / "jsons")


def config_for(images: Path, **changes) -> TrainConfig:
    return dataclasses.replace(demo_config(images, iterations=6), logging_save_csv=False, **changes)


def lora_files(tmp: Path) -> list[str]:
    folder = tmp / "Lora"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_all_problems_reported_at_once_before_any_model_work(tmp_path) -> None:
    config = TrainConfig(mode="LoRA", network_rank=0, train_learning_rate=-1, lora_data_directory=str(tmp_path / "no"))
    with pytest.raises(TrainTrainError) as caught:
        run_training(RunContext(config, build_tiny("sd1"), dirs_in(tmp_path)))
    lines = str(caught.value).splitlines()
    assert len(lines) >= 4, lines  # heading + rank + learning rate + data folder
    assert any("rank" in line for line in lines) and any("learning rate" in line for line in lines)
    assert lora_files(tmp_path) == []


def test_save_name_is_kept_inside_the_lora_folder(images, tmp_path) -> None:
    result = run_training(RunContext(config_for(images, save_lora_name="../../evil/..name"), build_tiny("sd1"), dirs_in(tmp_path)))
    assert result.path.parent == (tmp_path / "Lora").resolve()
    assert not (tmp_path / "evil").exists()


def test_stop_saves_the_lora_so_far_as_step_file(images, tmp_path) -> None:
    stop = StopFlag()

    def progress(p) -> None:
        if p.step == 3:
            stop.request(save=True)

    result = run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path), progress, stop))
    assert result.stopped and result.steps == 3
    assert lora_files(tmp_path) == ["demo_3steps.safetensors"] and result.path.name == "demo_3steps.safetensors"


def test_stop_without_saving_writes_nothing(images, tmp_path) -> None:
    stop = StopFlag()
    stop.request(save=False)
    result = run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path), None, stop))
    assert result.stopped and result.path is None and lora_files(tmp_path) == []


def test_nan_stops_with_a_message_and_keeps_the_last_good_save(images, tmp_path) -> None:
    config = config_for(images, train_learning_rate=10, network_alpha=1024, save_per_steps=1, train_optimizer="SGDNesterov")
    with pytest.raises(TrainTrainError, match=r"(NaN|nan|inf).*step \d+"):
        run_training(RunContext(config, build_tiny("sd1"), dirs_in(tmp_path)))
    saved = lora_files(tmp_path)
    assert "demo.safetensors" not in saved and not any(name.startswith(".") for name in saved)
    for name in saved:  # whatever was saved before the blow-up is intact and finite
        tensors, _ = kohya_io.read_network_file(tmp_path / "Lora" / name)
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_out_of_memory_is_a_clear_message(images, tmp_path, monkeypatch) -> None:
    import traintrain.modes.lora as lora_mode

    calls = {"n": 0}
    real = lora_mode.Objective.loss

    def exploding(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lora_mode.Objective, "loss", exploding)
    with pytest.raises(TrainTrainError, match="Out of GPU memory at step 3: turn on gradient checkpointing"):
        run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path)))
    monkeypatch.undo()
    result = run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path)))
    assert result.path.exists(), "the next job runs normally"


@pytest.mark.parametrize("raised_by", ["safetensors", "os"])
def test_disk_full_leaves_no_partial_file(images, tmp_path, monkeypatch, raised_by) -> None:
    import traintrain.files as files

    real_save = files.save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        if raised_by == "os":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, "/dev/full", metadata=metadata)  # the real SafetensorError of a full disk

    monkeypatch.setattr(files, "save_file", full_disk)
    with pytest.raises(TrainTrainError, match=r"the disk is full \(No space left on device\)\. Free some space"):
        run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path)))
    assert lora_files(tmp_path) == [], "neither the final file nor a temp file is left behind"


def test_unwritable_lora_folder_is_a_clear_error(images, tmp_path) -> None:
    blocker = tmp_path / "Lora"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(TrainTrainError, match="Cannot write|Could not write|not a folder|exists"):
        run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path)))


def test_pickled_resume_file_is_refused(images, tmp_path) -> None:
    """.pt LoRAs are read weights-only: a pickled object that is not a tensor is refused, never built."""
    evil = tmp_path / "evil.pt"
    torch.save({"x": Path("an object, not a tensor")}, evil)
    with pytest.raises(TrainTrainError, match="not a readable .pt LoRA"):
        run_training(RunContext(config_for(images, network_resume=str(evil)), build_tiny("sd1"), dirs_in(tmp_path)))
    ckpt = tmp_path / "x.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(TrainTrainError, match="only .safetensors and .pt"):
        run_training(RunContext(config_for(images, network_resume=str(ckpt)), build_tiny("sd1"), dirs_in(tmp_path)))


def test_resume_continues_from_a_saved_lora(images, tmp_path) -> None:
    first = run_training(RunContext(config_for(images, save_precision="fp32"), build_tiny("sd1"), dirs_in(tmp_path)))
    resumed = run_training(
        RunContext(config_for(images, network_resume=str(first.path), save_lora_name="more"), build_tiny("sd1"), dirs_in(tmp_path))
    )
    assert resumed.losses[0] < first.losses[0], "resuming starts from the trained weights, not from zero"


LIMITS = (0, 1, -1, 8, 63, 64, 1024, 1025, 4096, 4097, 10**6, 10**6 + 1, 2**32, 2**63, 10**400, -(10**400))
NUMBERS = st.sampled_from(LIMITS) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=20) | NUMBERS.map(str) | st.just("9" * 400),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from([spec.key for spec in FIELDS] + ["mode", "2nd pass", "unknown"])
SETTINGS = st.dictionaries(KEYS, JSON_VALUES, max_size=8)


def nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=SETTINGS | SETTINGS.map(lambda d: {**d, "2nd pass": d}), name=st.text(max_size=40),
       depth=st.sampled_from([0, 0, 50, 500]))  # fmt: skip
def test_fuzzed_settings_only_ever_raise_train_train_error(tmp_path, data, name, depth) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(nested(data, depth) if depth else data))
    try:
        config = TrainConfig.load_json(path)
        config.save_lora_name = name
        for problem in settings_problems(config, model_files=True):
            assert isinstance(problem, str) and len(problem) < 2000, "a message never repeats a huge value"
        config.validate()
    except TrainTrainError:
        return
    target = (tmp_path / "Lora" / f"{config.effective_name}.safetensors").resolve()
    assert target.parent == (tmp_path / "Lora").resolve()


def test_saved_files_get_normal_permissions(images, tmp_path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        result = run_training(RunContext(config_for(images), build_tiny("sd1"), dirs_in(tmp_path)))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o644, "readable by the WebUI whatever user it runs as"


def test_intermediate_saves_never_replace_files_of_an_earlier_run(images, tmp_path) -> None:
    earlier = tmp_path / "Lora" / "demo_2steps.safetensors"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's file")
    result = run_training(RunContext(config_for(images, save_per_steps=2, save_overwrite=False), build_tiny("sd1"), dirs_in(tmp_path)))
    assert earlier.read_bytes() == b"an earlier run's file"
    assert {"demo_2steps_1.safetensors", "demo_4steps.safetensors", "demo.safetensors"} <= set(lora_files(tmp_path))
    assert result.path.name == "demo.safetensors"


def test_schedule_free_periodic_saves_hold_the_evaluation_weights(images, tmp_path, monkeypatch) -> None:
    import traintrain.loop as loop

    optimizers = []
    real = loop.build_optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", recording)
    seen = []
    import traintrain.modes.common as common

    real_save = common.save_network

    def save(*args, **kwargs):
        seen.append(optimizers[0].param_groups[0]["train_mode"])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(common, "save_network", save)
    config = config_for(images, train_optimizer="AdamWScheduleFree", save_per_steps=2, train_learning_rate=1e-3)
    run_training(RunContext(config, build_tiny("sd1"), dirs_in(tmp_path)))
    assert seen == [False, False, False], "every save (steps 2, 4 and the final one) is made in eval mode"


def test_resume_in_a_prompt_mode_keeps_only_unet_modules_and_real_metadata(images, tmp_path) -> None:
    lora = run_training(RunContext(config_for(images, save_precision="fp32", network_rank=4), build_tiny("sd1"), dirs_in(tmp_path)))
    tensors, _ = kohya_io.read_network_file(lora.path)
    assert any(k.startswith("lora_te") for k in tensors)
    ileco = TrainConfig(
        mode="iLECO", original_prompt="a red circle", save_lora_name="resumed", network_resume=str(lora.path),
        train_iterations=2, image_size=(64, 64), network_rank=16, train_model_precision="fp32", logging_save_csv=False,
    )
    result = run_training(RunContext(ileco, build_tiny("sd1"), dirs_in(tmp_path)))
    tensors, metadata = kohya_io.read_network_file(result.path)
    assert tensors and not any(k.startswith("lora_te") for k in tensors), "prompt modes train the UNet only"
    assert metadata["ss_network_dim"] == "4", "the metadata describes the resumed network, not the settings"
