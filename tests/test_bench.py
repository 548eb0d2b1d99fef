"""The bench command's CPU smoke on the tiny model: the report lines, the timing window, the reference adapters."""

from __future__ import annotations

import math
import re

import pytest
import torch
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPTextModel

from traintrain.bench import main, run_bench
from traintrain.bench.models import bench_bundle, materialise
from traintrain.bench.reference import plain_adapters, time_reference
from traintrain.bench.settings import BenchSettings
from traintrain.bench.timing import PeakMemory, StepClock, first_timed_step, time_mode
from traintrain.errors import TrainTrainError
from traintrain.models.tiny import build_tiny
from traintrain.progress import Progress

RATE = re.compile(r"^(mode|reference) \(.+\): ([0-9.]+) steps/s, ([0-9.]+) images/s, peak ([0-9.]+) GiB", re.M)
RATIO = re.compile(r"^ratio: ([0-9.]+) \(mode / reference\)$", re.M)


@pytest.fixture(scope="module")
def smoke() -> str:
    """The printout of the CI smoke (`bench --model tiny --steps 5`, fewer warm-up steps), run once in-process."""
    lines: list[str] = []
    run_bench(BenchSettings(model="tiny", steps=5, warmup=2), out=lines.append)
    return "\n".join(lines)


def test_smoke_prints_rates_and_ratio(smoke):
    rates = {name: (float(steps), float(images), float(peak)) for name, steps, images, peak in RATE.findall(smoke)}
    assert set(rates) == {"mode", "reference"}
    for steps_per_s, images_per_s, peak in rates.values():
        assert steps_per_s > 0 and images_per_s == pytest.approx(steps_per_s, rel=1e-3)  # batch 1
        assert peak > 0
    ratio = RATIO.search(smoke)
    assert ratio and float(ratio.group(1)) > 0


def test_smoke_reports_its_context(smoke):
    assert re.search(
        r"^device: cpu \(.+\), torch [0-9.]+.*, dtype float32, batch 1, resolution 64, grad-ckpt off$", smoke, re.M
    )
    assert "peak RSS" in smoke and "not GPU memory" in smoke
    assert "warm-up 2 steps, timed 5 steps" in smoke
    assert "(5 steps in " in smoke  # the mode's window is exactly the timed steps on the CPU


def test_cli_ileco_batch_and_checkpointing(capsys):
    assert (
        main(["--model", "tiny", "--mode", "ileco", "--batch", "2", "--grad-ckpt", "--steps", "2", "--warmup", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "mode iLECO" in out and "batch 2" in out and "grad-ckpt on" in out
    rates = dict((name, float(images) / float(steps)) for name, steps, images, _ in RATE.findall(out))
    assert rates == {"mode": pytest.approx(2.0, rel=1e-2), "reference": pytest.approx(2.0, rel=1e-2)}  # 2 images a step
    assert RATIO.search(out)


def test_bad_settings_exit_2(capsys):
    assert main(["--resolution", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    with pytest.raises(TrainTrainError, match="at least 1"):
        BenchSettings(steps=0).check()


def test_mode_timing_starts_at_a_progress_event():
    assert first_timed_step(3, torch.device("cpu")) == 3  # an event after every step on the CPU
    assert first_timed_step(3, torch.device("cuda")) == 10  # after every 10th on a GPU (loss read-back)
    assert first_timed_step(20, torch.device("cuda")) == 20
    clock = StepClock(torch.device("cpu"), start=3, memory=PeakMemory(torch.device("cpu")))
    for step in range(1, 9):
        clock(Progress(step, 8, 0.5, 1e-4, float(step), 0.0))
    measured = clock.measurement(batch=4)
    assert (
        measured.steps == 5
        and measured.seconds > 0
        and measured.images_per_s == pytest.approx(4 * measured.steps_per_s)
    )


def test_plain_adapters_swap_in_and_restore_exactly():
    bundle = bench_bundle("tiny", torch.device("cpu"), torch.float32)
    unet = bundle.components.unet
    layers = [t.module for t in bundle.lora_targets() if t.role in ("attn1", "attn2")]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
        with plain_adapters(unet, layers, torch.device("cpu")) as adapters:
            assert len(adapters) == len(layers)
            assert torch.equal(unet(x, t, ctx).sample, before)  # lora_up starts at zero
            for adapter in adapters:
                adapter.up.weight.fill_(0.01)
            assert not torch.equal(unet(x, t, ctx).sample, before)
        assert torch.equal(unet(x, t, ctx).sample, before)
    assert {id(m) for m in unet.modules()} >= {id(m) for m in layers}


def test_materialise_gives_meta_models_real_weights_and_keeps_buffers():
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    with init_empty_weights():
        model = CLIPTextModel(config)
    materialise(model, torch.device("cpu"), torch.bfloat16)
    params = list(model.parameters())
    assert all(not p.is_meta and p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert any(p.float().std() > 0 for p in params)
    position_ids = getattr(model, "text_model", model).embeddings.position_ids  # transformers 5 drops text_model
    assert torch.equal(position_ids[0], torch.arange(77))
    out = model(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(out.float()).all()


def test_sdxl_conditioning_paths_on_the_tiny_sdxl_model():
    """Pooled text and size ids reach the UNet in both contenders (the full SDXL takes the same code paths)."""
    bundle = build_tiny("sdxl")
    settings, memory = BenchSettings(model="tiny", mode="ileco", steps=2, warmup=1), PeakMemory(bundle.device)
    for measured in (time_mode(bundle, settings, memory), time_reference(bundle, settings, memory)):
        assert measured.steps == 2 and measured.steps_per_s > 0 and math.isfinite(measured.loss)
