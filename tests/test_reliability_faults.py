"""Stop paths under faults: SIGTERM while training or while loading the model, disk full between periodic saves, a
read-only Lora folder. Each ends with a message, and what was saved stays whole."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import traintrain.files as files
from traintrain.__main__ import main
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.networks.kohya_io import read_network_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def config_for(images: Path, **changes):
    return dataclasses.replace(demo_config(images, iterations=6), logging_save_csv=False, **changes)


def test_sigterm_while_training_saves_the_lora_so_far(images, tmp_path) -> None:
    config_for(images, train_iterations=100_000, save_lora_name="term").save_json(tmp_path / "run.json")
    command = [sys.executable, "-m", "traintrain", "train", "--config", str(tmp_path / "run.json"), "--model", "tiny",
               "--out", str(tmp_path / "out")]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "step" not in seen:  # the tqdm line shows steps: the loop runs
            seen += process.stderr.read(1)
            assert process.poll() is None, seen
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Stopped at step" in out
    (saved,) = (tmp_path / "out").iterdir()
    assert saved.name.startswith("term-step") and read_network_file(saved)[0]


def test_a_signal_while_the_model_loads_ends_with_a_message(images, tmp_path, monkeypatch, capsys) -> None:
    import traintrain.models.open as open_module

    real_open = open_module.open_model

    def open_while_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the WebUI / a service manager shuts down during the load
        return real_open(*args, **kwargs)

    monkeypatch.setattr(open_module, "open_model", open_while_signalled)
    config_for(images).save_json(tmp_path / "run.json")
    code = main(["train", "--config", str(tmp_path / "run.json"), "--model", "tiny", "--out", str(tmp_path / "out")])
    assert code == 130 and "Stopped while loading the model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handlers are given back"


def test_disk_full_between_periodic_saves_keeps_the_earlier_ones_whole(images, tmp_path, monkeypatch) -> None:
    real_save = files.save_file
    calls = []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            real_save(tensors, "/dev/full", metadata=metadata)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", fills_up)
    dirs = OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "jsons")
    with pytest.raises(TrainTrainError, match="the disk is full"):
        run_training(RunContext(config_for(images, save_per_steps=2), build_tiny("sd1"), dirs))
    assert sorted(p.name for p in dirs.lora.iterdir()) == ["demo_2steps.safetensors"], "no partial or temp file"
    tensors, _ = read_network_file(dirs.lora / "demo_2steps.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_read_only_lora_folder_is_refused_before_training(images, tmp_path, monkeypatch) -> None:
    import tempfile

    import traintrain.modes.lora as lora_mode

    lora = tmp_path / "Lora"
    lora.mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002 - mkstemp's own keyword
        if Path(dir) == lora:
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(lora_mode, "train_lora", lambda ctx: pytest.fail("training began"))
    with pytest.raises(TrainTrainError, match="Cannot write into .*Read-only file system"):
        run_training(RunContext(config_for(images), build_tiny("sd1"), OutputDirs(lora, tmp_path / "l", tmp_path / "j")))
