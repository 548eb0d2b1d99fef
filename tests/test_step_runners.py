"""How steps run: eager, replayed CUDA graphs (their bookkeeping, checked on the CPU with a stand-in graph backend that
has the CUDA backend's contract: capture records without running, replay runs on the static buffers), compiled."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from traintrain import loop
from traintrain.config import TrainConfig
from traintrain.config_fields import BLOCKS_SD
from traintrain.cuda_graphs import CapturedSteps
from traintrain.models.targets import TEXT_BLOCK
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.optim import build_optimizer, build_scheduler, current_lrs, graph_refusal
from traintrain.step import EagerSteps, OptimizerStep, StepInputs


class RecordedGraph:
    """Replays the recorded body on whatever its static buffers hold now, writing the static output in place."""

    def __init__(self, body: Callable[[], torch.Tensor], output: torch.Tensor, drift: float) -> None:
        self.body, self.output, self.drift = body, output, drift

    def replay(self) -> None:
        self.output.copy_(self.body() + self.drift)


class StandInBackend:
    """The CudaGraphBackend contract on the CPU; `drift` makes replays disagree, `fail` makes captures raise."""

    def __init__(self, drift: float = 0.0, fail: bool = False) -> None:
        self.drift, self.fail, self.captures = drift, fail, 0

    def warmup(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def capture(self, body: Callable[[], torch.Tensor]) -> tuple[RecordedGraph, torch.Tensor]:
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        output = torch.zeros(())
        return RecordedGraph(body, output, self.drift), output

    def synchronize(self) -> None:
        pass


def model_and_step(optimizer_name: str = "AdamW") -> tuple[torch.nn.Linear, OptimizerStep]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)

    def loss(inputs: StepInputs) -> torch.Tensor:
        scale = 2.0 if inputs.variant == 1 else 1.0
        return F.mse_loss(layer(inputs["x"]) * scale, inputs["y"])

    optimizer = build_optimizer(optimizer_name, [{"params": list(layer.parameters())}], 1e-2)
    return layer, OptimizerStep(loss, optimizer, None, torch.device("cpu"))


def batches(count: int) -> list[StepInputs]:
    """Steps of two shapes (like two buckets) and two variants (like ADDifT's even / odd steps)."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for index in range(count):
        rows = 4 if index % 3 else 2
        x, y = torch.randn(rows, 6, generator=generator), torch.randn(rows, 3, generator=generator)
        steps.append(StepInputs({"x": x, "y": y}, variant=index % 2))
    return steps


def train(
    runner_for: Callable[[OptimizerStep], Callable[[StepInputs], torch.Tensor]], count: int = 30, optimizer: str = "AdamW"
):
    layer, step = model_and_step(optimizer)
    runner = runner_for(step)
    losses = [float(runner(inputs)) for inputs in batches(count)]
    return layer, losses, runner


@pytest.mark.parametrize(
    "optimizer, whole_step",
    [("AdamW", True), ("AdamW", False), ("Prodigy", False), ("AdaFactor", False)],
    ids=["adamw-whole-step", "adamw-forward-backward", "prodigy-forward-backward", "adafactor-forward-backward"],
)
def test_graph_replays_train_exactly_like_eager_steps(optimizer: str, whole_step: bool) -> None:
    """Whole-step graphs (optimizer inside) and forward-backward graphs (any optimizer steps after the replay): the
    capture's check runs one step eagerly and puts back all the state, tensors and plain values (Prodigy's d,
    Adafactor's step count), so every step happens exactly once."""
    eager_layer, eager_losses, _ = train(EagerSteps, optimizer=optimizer)
    backend = StandInBackend()
    layer, losses, runner = train(lambda step: CapturedSteps(step, backend, whole_step=whole_step), optimizer=optimizer)
    assert runner.captured == 4 == backend.captures  # 2 shapes x 2 variants, each after its eager warm-up steps
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    # Every step done exactly once (the capture's check runs the step eagerly, then restores the state first).
    torch.testing.assert_close(layer.weight, eager_layer.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.bias, eager_layer.bias, rtol=1e-6, atol=1e-7)


def test_a_replay_that_disagrees_with_the_eager_step_is_not_used(caplog) -> None:
    eager_layer, eager_losses, _ = train(EagerSteps)
    with caplog.at_level(logging.WARNING, logger="traintrain.cuda_graphs"):
        layer, losses, runner = train(lambda step: CapturedSteps(step, StandInBackend(drift=0.5), whole_step=True))
    assert runner.captured == 0 and len(runner.refusals) == 4
    assert "differs from the eager step" in caplog.text
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    torch.testing.assert_close(layer.weight, eager_layer.weight, rtol=1e-6, atol=1e-7)


def test_a_failed_capture_leaves_those_steps_eager() -> None:
    eager_layer, eager_losses, _ = train(EagerSteps)
    layer, losses, runner = train(lambda step: CapturedSteps(step, StandInBackend(fail=True), whole_step=False))
    assert runner.captured == 0 and all("capture failed: operation not permitted" in r for r in runner.refusals)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    torch.testing.assert_close(layer.weight, eager_layer.weight, rtol=1e-6, atol=1e-7)


def test_only_fused_adam_on_a_gpu_steps_inside_the_graph() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw = build_optimizer("AdamW", [{"params": params}], 1e-3, capturable=True)  # CPU: foreach, not capturable
    assert "cannot step inside a CUDA graph" in graph_refusal(adamw, None)
    sgd = build_optimizer("SGDNesterov", [{"params": params}], 1e-3, capturable=True)
    assert "only fused AdamW / Adam" in graph_refusal(sgd, None)


def test_tensor_learning_rates_follow_the_schedule_and_read_back_later() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW(params, lr=torch.tensor(1e-3))
    scheduler = build_scheduler("linear", optimizer, iterations=4)
    seen = []
    for _ in range(4):
        seen.append(current_lrs(optimizer))
        optimizer.step()
        scheduler.step()
    assert all(isinstance(lr, torch.Tensor) for lrs in seen for lr in lrs)  # copies, read after the next sync
    assert [float(lrs[0]) for lrs in seen] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def unet_blocks() -> list[str]:
    return [block for block in BLOCKS_SD if block != TEXT_BLOCK]


def test_compiled_steps_train_like_eager_ones(tmp_path: Path, monkeypatch, sample_images) -> None:
    """use_torch_compile traces the real step (LoRA hooks included) through dynamo and AOT autograd; the aot_eager
    backend stands in for inductor's code generation, which takes minutes on this CPU."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    losses = {}
    for compiled in (False, True):
        config = TrainConfig(
            mode="LoRA", lora_data_directory=str(sample_images), image_size=(64, 64), image_min_length=64,
            image_buckets_step=64, train_iterations=4, train_batch_size=1, train_seed=0, train_model_precision="fp32",
            save_precision="fp32", save_overwrite=True, train_lr_scheduler="constant", train_learning_rate=1e-3,
            network_blocks=unet_blocks(), use_torch_compile=compiled, save_lora_name=f"compiled_{compiled}",
        )
        dirs = OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "jsons")
        losses[compiled] = run_training(RunContext(config, build_tiny("sd1"), dirs)).losses
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory) -> Path:
    from traintrain.demo import write_sample_images

    return write_sample_images(tmp_path_factory.mktemp("images") / "images", size=64)


def mode_config(mode: str, images: Path, pair: tuple[str, str], **changes) -> TrainConfig:
    settings = dict(
        mode=mode, lora_data_directory=str(images), original_image=pair[0], target_image=pair[1],
        original_prompt="a red apple", target_prompt="a blue car", image_size=(64, 64), image_min_length=64,
        image_buckets_step=64, train_iterations=12, train_batch_size=2, train_seed=0, train_model_precision="fp32",
        save_precision="fp32", save_overwrite=True, train_lr_scheduler="cosine", train_learning_rate=1e-3,
        save_lora_name=f"{mode}_{changes.get('use_cuda_graph', True)}",
    )
    return TrainConfig(**{**settings, **changes})


@pytest.mark.parametrize(
    "mode, blocks",
    [("LoRA", list(BLOCKS_SD)), ("iLECO", unet_blocks()), ("ADDifT", unet_blocks()), ("Difference", unet_blocks())],
    ids=["lora-with-text-encoder", "ileco", "addift", "difference"],
)
@pytest.mark.parametrize("whole_step", [True, False], ids=["whole-step", "forward-backward"])
def test_every_mode_runs_through_graph_replays_like_eager(
    mode, blocks, whole_step, tmp_path, sample_images, monkeypatch, caplog
):
    """The loop's graph path with the stand-in backend on the CPU: every mode's loss reads only its step inputs (the
    replay runs on the static buffers) and trains exactly as the eager steps do."""
    from PIL import Image

    pair = []
    for name, color in (("original", (220, 30, 30)), ("target", (30, 60, 220))):
        Image.new("RGB", (64, 64), color).save(tmp_path / f"{name}.png")
        pair.append(str(tmp_path / f"{name}.png"))
    dirs = OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "jsons")
    eager_config = mode_config(mode, sample_images, pair, network_blocks=blocks, use_cuda_graph=False)
    eager = run_training(RunContext(eager_config, build_tiny("sd1"), dirs))
    monkeypatch.setattr("traintrain.loop.CudaGraphBackend", StandInBackend)
    refusal = "" if whole_step else "the optimizer is not capturable here"
    monkeypatch.setattr("traintrain.loop.graph_refusal", lambda optimizer, scheduler: refusal)
    real_runner = loop._step_runner
    monkeypatch.setattr(
        loop, "_step_runner", lambda settings, step, optimizer, scheduler, device, graphs: real_runner(
            settings, step, optimizer, scheduler, device, True
        )
    )
    with caplog.at_level(logging.INFO, logger="traintrain.cuda_graphs"):
        config = mode_config(mode, sample_images, pair, network_blocks=blocks)
        graphed = run_training(RunContext(config, build_tiny("sd1"), dirs))
    assert "CUDA graph captured" in caplog.text and "not used" not in caplog.text
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("blocks", [unet_blocks(), list(BLOCKS_SD)], ids=["unet", "with-text-encoder"])
def test_lora_mode_on_cuda_replays_graphs_and_trains_like_eager(blocks, tmp_path: Path, sample_images, caplog) -> None:
    losses = {}
    for graphs in (False, True):
        config = TrainConfig(
            mode="LoRA", lora_data_directory=str(sample_images), image_size=(64, 64), image_min_length=64,
            image_buckets_step=64, train_iterations=40, train_batch_size=2, train_seed=0, train_model_precision="bf16",
            save_precision="fp32", save_overwrite=True, train_lr_scheduler="cosine", train_learning_rate=1e-3,
            network_blocks=blocks, use_cuda_graph=graphs, save_lora_name=f"graphs_{graphs}",
        )
        dirs = OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "jsons")
        with caplog.at_level(logging.INFO, logger="traintrain.cuda_graphs"):
            losses[graphs] = run_training(RunContext(config, build_tiny("sd1", device="cuda"), dirs)).losses
    assert "CUDA graph captured" in caplog.text and "CUDA graph not used" not in caplog.text
    assert sum(losses[True][-10:]) == pytest.approx(sum(losses[False][-10:]), rel=0.05)


def test_learning_rates_held_as_tensors_are_read_at_the_read_back(tmp_path, sample_images, monkeypatch) -> None:
    """Under CUDA graphs the learning rates are device tensors: the loop keeps copies and reads them with the losses,
    so the CSV and the progress events show plain numbers for the right steps."""
    real = loop.current_lrs
    monkeypatch.setattr(loop, "current_lrs", lambda optimizer: [torch.tensor(lr) for lr in real(optimizer)])
    events = []
    config = mode_config("LoRA", sample_images, ("", ""), train_iterations=4, logging_save_csv=True)
    dirs = OutputDirs(tmp_path / "Lora", tmp_path / "logs", tmp_path / "jsons")
    run_training(RunContext(config, build_tiny("sd1"), dirs, progress=events.append))
    rows = (next((tmp_path / "logs").glob("*/*.csv"))).read_text().splitlines()[9:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4"]
    assert all(float(row.split(",")[2]) > 0 for row in rows)
    assert [event.step for event in events] == [1, 2, 3, 4] and all(isinstance(e.lr, float) for e in events)
