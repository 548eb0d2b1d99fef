"""A stopped run resumed from its training state continues the same loss curve and ends with the same LoRA; files
saved with a strength other than 1 resume unscaled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.networks.kohya_io import network_from_file
from traintrain.train_state import load_state


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = write_sample_images(tmp_path_factory.mktemp("data") / "images")
    for caption in folder.glob("*.txt"):
        caption.write_text("shape, colour, white background, small", encoding="utf-8")
    return folder


def config_for(images: Path, **changes):
    settings = dict(
        train_iterations=8, train_lr_scheduler="cosine", train_ema_decay=0.8, train_noise_offset=0.05,
        caption_shuffle_tags=True, caption_tag_dropout_rate=0.2, train_gradient_accumulation_steps=2,
        save_training_state=True, logging_save_csv=False, save_precision="fp32", network_blocks=["IN01", "OUT02"],
    )  # fmt: skip
    return dataclasses.replace(demo_config(images), **{**settings, **changes})


def run(config, tmp: Path, stop_after: int = 0):
    ctx = RunContext(config, build_tiny("sd1"), OutputDirs(tmp / "Lora", tmp / "logs", tmp / "jsons"))
    if stop_after:
        ctx.progress = lambda p: ctx.stop.request(save=True) if p.step == stop_after else None
    return run_training(ctx)


def test_resumed_run_continues_the_loss_curve_of_an_uninterrupted_one(images, tmp_path):
    whole = run(config_for(images), tmp_path / "whole")
    assert len(whole.losses) == 8 and (tmp_path / "whole/logs/states/demo-state.safetensors").is_file()
    stopped = run(config_for(images), tmp_path / "stopped", stop_after=3)
    assert stopped.stopped and stopped.losses == whole.losses[:3]
    state_path = tmp_path / "stopped/logs/states/demo-step3-state.safetensors"
    state = load_state(state_path)
    assert state.step == 3 and state.seed == 0 and state.average["updates"] == 3 and state.scheduler["last_epoch"] == 3
    resumed = run(config_for(images, resume_training_state=str(state_path)), tmp_path / "resumed")
    assert resumed.steps == 8 and len(resumed.losses) == 5
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-6, abs=1e-8)
    final, again = load_file(str(whole.path)), load_file(str(resumed.path))
    assert final.keys() == again.keys()
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)
    fresh = run(config_for(images, train_iterations=5), tmp_path / "fresh")
    assert fresh.losses != pytest.approx(whole.losses[3:], rel=1e-3), "without the state the curve starts over"


def test_resume_takes_over_the_seed_and_refuses_what_does_not_fit(images, tmp_path):
    run(config_for(images, train_iterations=2), tmp_path / "first")
    state_path = str(tmp_path / "first/logs/states/demo-state.safetensors")
    random_seed = run(config_for(images, train_iterations=3, train_seed=-1, resume_training_state=state_path), tmp_path / "a")
    assert random_seed.steps == 3 and len(random_seed.losses) == 1
    with pytest.raises(TrainTrainError, match="seed 0"):
        run(config_for(images, train_iterations=3, train_seed=5, resume_training_state=state_path), tmp_path / "b")
    with pytest.raises(TrainTrainError, match="does not fit"):
        run(config_for(images, train_iterations=3, network_rank=4, resume_training_state=state_path), tmp_path / "c")
    with pytest.raises(TrainTrainError, match="train iterations"):
        run(config_for(images, train_iterations=2, resume_training_state=state_path), tmp_path / "d")
    lora = str(tmp_path / "first/Lora/demo.safetensors")
    with pytest.raises(TrainTrainError, match="not a TrainTrain training state"):
        run(config_for(images, train_iterations=3, resume_training_state=lora), tmp_path / "e")


def test_a_file_saved_at_another_strength_resumes_unscaled(images, tmp_path):
    plain = run(config_for(images, train_iterations=2, save_training_state=False), tmp_path / "plain")
    half = run(config_for(images, train_iterations=2, save_training_state=False, network_strength=0.5), tmp_path / "half")
    ups = [k for k in load_file(str(plain.path)) if "lora_up" in k]
    assert torch.allclose(load_file(str(half.path))[ups[0]], 0.5 * load_file(str(plain.path))[ups[0]], atol=1e-6)
    targets = build_tiny("sd1").lora_targets()
    a, b = network_from_file(plain.path, targets), network_from_file(half.path, targets)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
