"""Gradient accumulation equals one larger batch, clipping bounds the gradient norm, the weight EMA follows its formula
and is what gets saved."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from traintrain.config import TrainConfig
from traintrain.config_fields import parse_block_weights
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.ema import WARMUP_STEPS, WeightAverage
from traintrain.loop import LoopSettings, run_loop
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.networks.network import Network, NetworkSpec
from traintrain.optim import build_optimizer
from traintrain.step import OptimizerStep, StepInputs, TrainingStep

DATA = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 6, generator=DATA), torch.randn(8, 3, generator=DATA)


class Toy(torch.nn.Module):
    """A linear layer with the Network's optimizer-group interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 3)

    def param_groups(self, lr: float, text_encoder_lr: float | None = None, weights: dict | None = None) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr, "name": "unet"}]


def toy_step(toy: Toy, rows: int) -> TrainingStep:
    """Step (or micro-step) m trains on the m-th block of `rows` rows, cycling over the 8."""

    def inputs(index: int) -> StepInputs:
        start = (index * rows) % 8
        return StepInputs({"x": X[start : start + rows], "y": Y[start : start + rows]})

    return TrainingStep(inputs, lambda inputs: F.mse_loss(toy.layer(inputs["x"]), inputs["y"]))


def run(toy: Toy, rows: int, optimizer: str = "AdamW", records: list | None = None, **settings) -> list[float]:
    loop = LoopSettings(
        iterations=6, learning_rate=0.05, text_encoder_lr=0.0, optimizer=optimizer, optimizer_settings={},
        scheduler="constant", scheduler_settings={}, **settings,
    )  # fmt: skip
    progress = None if records is None else lambda _p: records.append([p.detach().clone() for p in toy.parameters()])
    return run_loop(loop, toy, toy_step(toy, rows), save=lambda *_: Path(), progress=progress).losses


@pytest.mark.parametrize("optimizer", ["AdamW", "SGDNesterov"])
@pytest.mark.parametrize("count, rows", [(2, 4), (4, 2)])
def test_k_steps_of_batch_b_equal_one_step_of_batch_k_times_b(optimizer, count, rows):
    small, big = Toy(), Toy()
    accumulated = run(small, rows, optimizer, accumulation=count)
    whole = run(big, 8, optimizer)
    assert accumulated == pytest.approx(whole, rel=1e-5, abs=1e-7)
    for a, b in zip(small.parameters(), big.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    unaccumulated = run(Toy(), rows, optimizer)
    assert unaccumulated != pytest.approx(whole, rel=1e-3)


def test_clipping_bounds_the_gradient_norm_and_leaves_small_ones_alone():
    def step_with(max_norm: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        toy = Toy()
        before = torch.cat([p.detach().flatten().clone() for p in toy.parameters()])
        optimizer = build_optimizer("SGDNesterov", toy.param_groups(1.0), 1.0, {"momentum": 0.0, "nesterov": False})
        loss = lambda inputs: scale * F.mse_loss(toy.layer(inputs["x"]), inputs["y"])  # noqa: E731
        step = OptimizerStep(loss, optimizer, None, torch.device("cpu"), max_grad_norm=max_norm)
        step(StepInputs({"x": X, "y": Y}))
        after = torch.cat([p.detach().flatten() for p in toy.parameters()])
        return before - after, torch.cat([p.grad.flatten() for p in toy.parameters()])

    update, _ = step_with(0.5, 100.0)  # plain SGD with lr 1: the update is the (clipped) gradient
    assert float(update.norm()) == pytest.approx(0.5, rel=1e-5)
    unclipped, _ = step_with(0.0, 100.0)
    assert float(unclipped.norm()) > 10 and torch.allclose(update, unclipped * 0.5 / unclipped.norm(), atol=1e-6)
    small, _ = step_with(1e6, 1.0)
    free, _ = step_with(0.0, 1.0)
    assert torch.equal(small, free)


def test_weight_average_follows_its_formula():
    weight = torch.zeros(3)
    average = WeightAverage([weight], decay=0.9)
    expected = torch.zeros(3)
    for n in range(40):
        weight.copy_(torch.full((3,), float(n + 1)))
        decay = min(0.9, (1 + n) / (WARMUP_STEPS + n))
        expected = decay * expected + (1 - decay) * weight
        average.update()
    assert torch.allclose(average.average[0], expected) and average.updates == 40
    with average.applied():
        assert torch.allclose(weight, expected)
    assert torch.equal(weight, torch.full((3,), 40.0))
    average.copy_to_parameters()
    assert torch.allclose(weight, expected)


def test_the_loop_leaves_the_average_of_each_steps_weights_in_the_network():
    toy, records = Toy(), []
    initial = [p.detach().clone() for p in toy.parameters()]
    run(toy, 8, records=records, ema_decay=0.8)
    assert len(records) == 6
    expected = initial
    for n, weights in enumerate(records):  # the progress callback sees each step's trained (not averaged) weights
        decay = min(0.8, (1 + n) / (WARMUP_STEPS + n))
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    for parameter, value, last in zip(toy.parameters(), expected, records[-1]):
        assert torch.allclose(parameter, value, atol=1e-6) and not torch.allclose(parameter, last, atol=1e-3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def train(images: Path, tmp: Path, **changes):
    settings = {"logging_save_csv": False, "save_precision": "fp32", **changes}
    config = dataclasses.replace(demo_config(images, iterations=6), **settings)
    return run_training(RunContext(config, build_tiny("sd1"), OutputDirs(tmp, tmp, tmp)))


def test_training_options_reach_a_real_run(images, tmp_path):
    base = train(images, tmp_path / "base")
    accumulated = train(images, tmp_path / "accumulated", train_gradient_accumulation_steps=2)
    assert accumulated.steps == 6 and accumulated.losses != base.losses
    clipped = train(images, tmp_path / "clipped", train_max_grad_norm=1e-9)
    assert clipped.losses[0] == base.losses[0] and clipped.losses != base.losses
    averaged = train(images, tmp_path / "ema", train_ema_decay=0.99)
    assert averaged.losses == base.losses, "the average does not change the training, only what is saved"
    plain, smoothed = load_file(str(base.path)), load_file(str(averaged.path))
    ups = [k for k in plain if "lora_up" in k]
    shrink = [float(smoothed[k].norm() / plain[k].norm()) for k in ups if plain[k].norm() > 0]
    assert shrink and max(shrink) < 0.97, "the saved file holds the average, nearer the zero-initialised up weights"


def test_block_weights_text_is_parsed_and_checked():
    assert parse_block_weights("") == {}
    assert parse_block_weights("in00=0.5; OUT11 = 2, BASE=0") == {"IN00": 0.5, "OUT11": 2.0, "BASE": 0.0}
    for bad in ("IN00", "IN99=1", "IN00=x", "IN00=1, IN00=2", "IN00=-1"):
        with pytest.raises(TrainTrainError, match="block lr weights"):
            parse_block_weights(bad)
    assert any("block lr weights" in p for p in TrainConfig(network_block_lr_weights="M00=nan").problems())


def test_block_weights_scale_each_blocks_learning_rate(images, tmp_path):
    bundle = build_tiny("sd1")
    network = Network.build(NetworkSpec(rank=4, alpha=4), bundle.lora_targets())
    groups = network.param_groups(1e-3, 1e-4, {"IN01": 0.5, "BASE": 2.0})
    lrs = {group["name"]: group["lr"] for group in groups}
    assert lrs["BASE"] == pytest.approx(2e-4) and lrs["IN01"] == pytest.approx(5e-4) and lrs["OUT02"] == 1e-3
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    assert [g["name"] for g in network.param_groups(1e-3)] == ["text_encoder", "unet"]
    frozen = train(images, tmp_path, network_block_lr_weights="IN01=0", logging_save_csv=True)
    saved = load_file(str(frozen.path))
    ups = {k: v for k, v in saved.items() if "lora_up" in k}
    in01 = [k for k in ups if network.blocks.get(k.split(".")[0]) == "IN01"]
    assert in01 and all(not ups[k].any() for k in in01), "a block at weight 0 keeps its zero-initialised up weights"
    assert any(ups[k].any() for k in ups if k not in in01)
    header = next(line for line in next(tmp_path.rglob("*.csv")).read_text().splitlines() if line.startswith("Step"))
    assert header.count("Learning Rate") == len(groups), "one learning-rate column per block group"
