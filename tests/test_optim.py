"""Optimizer and LR-scheduler factories: every listed optimizer trains a tiny regression on CPU, every scheduler has
the expected curve, and bad names, settings and missing packages raise TrainTrainError."""

import importlib
import logging
import math
import sys

import pytest
import torch

from traintrain import optim
from traintrain.config_fields import LR_SCHEDULERS, OPTIMIZERS
from traintrain.errors import TrainTrainError
from traintrain.optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer,
    check_scheduler,
    current_lrs,
    is_schedule_free,
    needs_metric,
    uses_own_schedule,
)

# Learning rate and settings per optimizer that make 20 steps of the toy regression converge.
TUNED = {
    "Prodigy": (1.0, {"d0": 1e-3}),
    "DadaptAdam": (0.2, {"d0": 1e-3}),
    "DadaptLion": (1.0, {"d0": 1e-4}),
    "DAdaptAdaGrad": (1.0, {"d0": 1e-3}),
    "DAdaptAdan": (0.2, {"d0": 1e-3}),
    "DAdaptSGD": (1.0, {"d0": 1e-3}),
    "Lion": (3e-3, {}),
    "Lion8bit": (3e-3, {}),
    "PagedLion8bit": (3e-3, {}),
    "Tiger": (3e-3, {}),
    "SGDNesterov": (0.05, {}),
    "SGDNesterov8bit": (0.05, {}),
    "SGDScheduleFree": (0.5, {}),
    "RAdamScheduleFree": (3e-2, {}),
}


def _toy(seed: int = 0):
    """A two-layer linear regression with a 64×64 layer (4096 weights: bitsandbytes' 8-bit state path)."""
    torch.manual_seed(seed)
    x = torch.randn(64, 64)
    y = x @ (torch.randn(64, 8) / 8)
    body, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)
    return x, y, body, head


def _train(optimizer, scheduler, x, y, body, head, steps=20):
    if is_schedule_free(optimizer):
        optimizer.train()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(head(body(x)), y)
        assert all(math.isfinite(lr) for lr in current_lrs(optimizer))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step(loss.item()) if needs_metric(scheduler) else scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.filterwarnings("ignore:Paged optimizers")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_a_tiny_regression(name):
    x, y, body, head = _toy()
    lr, settings = TUNED.get(name, (1e-2, {}))
    groups = [{"params": list(body.parameters()), "lr": lr}, {"params": list(head.parameters()), "lr": lr}]
    optimizer = build_optimizer(name, groups, lr, settings)
    scheduler = build_scheduler("constant", optimizer, iterations=20)
    losses = _train(optimizer, scheduler, x, y, body, head)
    assert losses[-1] < 0.8 * losses[0], losses


def test_names_are_case_insensitive_and_unknown_names_refused():
    x, y, body, head = _toy()
    assert type(build_optimizer("adamw", [{"params": body.parameters()}], 1e-3, {})).__name__ == "AdamW"
    assert type(build_optimizer("DADAPTADAM", [{"params": body.parameters()}], 1.0, {})).__name__ == "DAdaptAdam"
    with pytest.raises(TrainTrainError, match="Unknown optimizer"):
        build_optimizer("----", [{"params": body.parameters()}], 1e-3, {})
    with pytest.raises(TrainTrainError, match="no network module"):
        build_optimizer("AdamW", [{"params": []}], 1e-3, {})


def test_torch_optimizers_use_foreach_on_cpu_unless_settings_choose():
    _, _, body, _ = _toy()
    optimizer = build_optimizer("AdamW", [{"params": body.parameters()}], 1e-3, {"weight_decay": 0.1})
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert optimizer.defaults["weight_decay"] == 0.1
    optimizer = build_optimizer("AdamW", [{"params": body.parameters()}], 1e-3, {"foreach": False})
    assert optimizer.defaults["foreach"] is False


def test_sgd_nesterov_defaults_and_overrides():
    _, _, body, _ = _toy()
    optimizer = build_optimizer("SGDNesterov", [{"params": body.parameters()}], 0.1, {})
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9
    assert build_optimizer("SGDNesterov", [{"params": body.parameters()}], 0.1, {"momentum": 0.5}).defaults[
        "momentum"
    ] == 0.5


def test_bad_settings_name_the_key():
    _, _, body, _ = _toy()
    with pytest.raises(TrainTrainError, match="no setting betaz"):
        build_optimizer("AdamW", [{"params": body.parameters()}], 1e-3, {"betaz": (0.9, 0.99)})
    with pytest.raises(TrainTrainError, match="no setting bogus"):
        check_optimizer("CAME", {"bogus": 1})  # CAME takes **kwargs: still refused
    with pytest.raises(TrainTrainError, match="train learning rate"):
        check_optimizer("AdamW", {"lr": 1.0})
    with pytest.raises(TrainTrainError, match="refused its settings"):
        build_optimizer("AdamW", [{"params": body.parameters()}], 1e-3, {"betas": (2.0, 3.0)})


def test_adafactor_relative_step_sets_its_own_lr_and_schedule():
    x, y, body, head = _toy()
    groups = [{"params": list(body.parameters()) + list(head.parameters())}]
    optimizer = build_optimizer("AdaFactor", groups, 1e-4, {})
    assert optimizer.defaults["lr"] is None and uses_own_schedule(optimizer)
    scheduler = build_scheduler("cosine", optimizer, iterations=20)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    _train(optimizer, scheduler, x, y, body, head, steps=3)
    assert 0 < current_lrs(optimizer)[0] < 1e-2
    manual = build_optimizer("AdaFactor", groups, 1e-3, {"relative_step": False, "scale_parameter": False})
    assert manual.defaults["lr"] == 1e-3 and not uses_own_schedule(manual)
    assert isinstance(build_scheduler("cosine", manual, iterations=20), torch.optim.lr_scheduler.LambdaLR)


def test_schedule_free_optimizers_get_no_scheduler_and_report_the_scheduled_lr():
    x, y, body, head = _toy()
    optimizer = build_optimizer("AdamWScheduleFree", [{"params": body.parameters()}], 1e-2, {"warmup_steps": 4})
    assert is_schedule_free(optimizer)
    assert build_scheduler("cosine", optimizer, iterations=10) is None
    _train(optimizer, None, x, y, body, head, steps=2)
    assert current_lrs(optimizer) == [pytest.approx(1e-2 * 2 / 4)]


def test_adaptive_optimizers_warn_on_small_lr_and_use_one_lr(caplog):
    _, _, body, head = _toy()
    groups = [{"params": body.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 5e-5}]
    with caplog.at_level(logging.WARNING, logger="traintrain.optim"):
        optimizer = build_optimizer("Prodigy", groups, 1e-4, {})
    assert "use about 1.0" in caplog.text and "text encoder learning rate is ignored" in caplog.text
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 1e-4]
    assert current_lrs(optimizer) == [pytest.approx(1e-4 * 1e-6)] * 2  # d0 × lr


def test_adam_mini_keeps_each_groups_learning_rate():
    _, _, body, head = _toy()
    groups = [{"params": body.parameters(), "lr": 1e-3}, {"params": head.parameters(), "lr": 2e-3}]
    optimizer = build_optimizer("AdamMini", groups, 1e-3, {"weight_decay": 0.0})
    by_param = {id(group["params"][0]): group["lr"] for group in optimizer.param_groups}
    assert by_param[id(body.weight)] == 1e-3 and by_param[id(head.bias)] == 2e-3


def test_missing_package_says_what_to_install(monkeypatch):
    _, _, body, _ = _toy()
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(TrainTrainError, match="pip install prodigyopt"):
        build_optimizer("Prodigy", [{"params": body.parameters()}], 1.0, {})
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # Lion falls back to pytorch_optimizer's
    assert type(build_optimizer("Lion", [{"params": body.parameters()}], 1e-4, {})).__module__.startswith(
        "pytorch_optimizer"
    )


def test_unusable_bitsandbytes_is_a_clear_error(monkeypatch):
    _, _, body, _ = _toy()
    real_import = importlib.import_module

    def broken(name, *args):
        if name.startswith("bitsandbytes"):
            raise RuntimeError("CUDA Setup failed")
        return real_import(name, *args)

    with monkeypatch.context() as patch:
        patch.setattr(importlib, "import_module", broken)
        with pytest.raises(TrainTrainError, match="cannot be loaded.*CUDA Setup failed"):
            build_optimizer("AdamW8bit", [{"params": body.parameters()}], 1e-3, {})
    bitsandbytes = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")
    with pytest.raises(TrainTrainError, match="cannot step CPU tensors"):
        build_optimizer("AdamW8bit", [{"params": body.parameters()}], 1e-3, {})


def _curve(name, iterations=20, lr=1.0, optimizer="SGDNesterov", **kwargs):
    """The learning rate used at each of `iterations` steps."""
    param = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(optimizer, [{"params": [param]}], lr, {})
    scheduler = build_scheduler(name, opt, iterations=iterations, **kwargs)
    lrs = []
    for _ in range(iterations):
        lrs.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(4)
        opt.step()
        scheduler.step(1.0) if needs_metric(scheduler) else scheduler.step()
    return lrs


def test_every_listed_scheduler_builds_and_runs():
    for name in LR_SCHEDULERS:
        lrs = _curve(name.upper(), step_rules="1:3,0.5:6,0.1")
        assert len(lrs) == 20 and all(lr >= 0 and math.isfinite(lr) for lr in lrs), name


def test_diffusers_style_curves():
    linear = _curve("linear")
    assert linear[0] == 1.0 and linear == sorted(linear, reverse=True) and linear[-1] == pytest.approx(1 / 20)
    cosine = _curve("cosine")
    assert cosine[0] == 1.0 and cosine[10] == pytest.approx(0.5) and cosine[-1] < 0.01
    warm = _curve("cosine", warmup_steps=5)
    assert warm[:6] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0]) and warm[-1] < 0.02
    restarts = _curve("cosine_with_restarts", num_cycles=2)
    assert restarts[9] < 0.05 and restarts[10] == 1.0 and restarts[0] == 1.0
    polynomial = _curve("polynomial", power=2.0, settings={"lr_end": 0.1})
    assert polynomial[5] == pytest.approx(0.9 * (1 - 5 / 20) ** 2 + 0.1)
    assert _curve("constant") == [1.0] * 20
    assert _curve("constant_with_warmup", warmup_steps=4)[:6] == [0, 0.25, 0.5, 0.75, 1.0, 1.0]
    piecewise = _curve("piecewise_constant", iterations=8, step_rules="1:3,0.5:6,0.1")
    assert piecewise == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.1, 0.1])


def test_torch_scheduler_curves():
    step = _curve("step", iterations=12)
    assert step[9] == 1.0 and step[10] == pytest.approx(0.1)
    assert _curve("step", iterations=4, settings={"step_size": 2, "gamma": 0.5}) == pytest.approx([1, 1, 0.5, 0.5])
    assert _curve("exponential", iterations=3) == pytest.approx([1, 0.9, 0.81])
    multi = _curve("multi_step", iterations=40)
    assert multi[29] == 1.0 and multi[30] == pytest.approx(0.1)
    annealing = _curve("cosine_annealing", settings={"eta_min": 1e-5})
    assert annealing[0] == 1.0 and annealing[-1] < 0.01
    assert _curve("cosine_annealing_with_restarts")[10] == pytest.approx(1.0)
    cyclic = _curve("cyclic", optimizer="AdamW")
    assert cyclic[0] == pytest.approx(1e-5) and cyclic == sorted(cyclic)
    no_momentum = _curve("cyclic", optimizer="AdaFactor", lr=1e-3)  # Adafactor(relative_step) keeps its own
    assert no_momentum  # built and stepped without a momentum/betas error
    one_cycle = _curve("one_cycle", iterations=30)  # exactly `iterations` steps must not overrun total_steps
    assert max(one_cycle) == pytest.approx(1e-3) and one_cycle[-1] < 1e-4


def test_reduce_on_plateau_is_stepped_with_the_loss():
    lrs = _curve("reduce_on_plateau", iterations=8, settings={"patience": 2})
    assert lrs[:4] == [1.0] * 4 and lrs[4] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)


def test_adafactor_with_cyclic_gets_no_momentum_cycling():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer("AdaFactor", [{"params": [param]}], 1e-3, {"relative_step": False})
    scheduler = build_scheduler("cyclic", opt, iterations=10)
    assert scheduler.cycle_momentum is False


def test_scheduler_settings_are_checked():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer("AdamW", [{"params": [param]}], 1e-3, {})
    with pytest.raises(TrainTrainError, match="Unknown LR scheduler"):
        build_scheduler("warmup_cosine", opt, iterations=10)
    with pytest.raises(TrainTrainError, match="cosine has no setting eta_min"):
        build_scheduler("cosine", opt, iterations=10, settings={"eta_min": 0.0})
    with pytest.raises(TrainTrainError, match="no setting T_maxx"):
        check_scheduler("cosine_annealing", {"T_maxx": 3})
    with pytest.raises(TrainTrainError, match="no setting total_steps"):
        check_scheduler("one_cycle", {"total_steps": 5})
    with pytest.raises(TrainTrainError, match="step rules"):
        build_scheduler("piecewise_constant", opt, iterations=10, step_rules="")
    with pytest.raises(TrainTrainError, match="lr_end"):
        build_scheduler("polynomial", opt, iterations=10, settings={"lr_end": 1.0})
    with pytest.raises(TrainTrainError, match="refused its settings"):
        build_scheduler("cyclic", opt, iterations=10, settings={"mode": "sideways"})


def test_optim_module_lists_every_optimizer_once():
    assert len(set(OPTIMIZERS)) == len(OPTIMIZERS) and "----" not in OPTIMIZERS
    for name in OPTIMIZERS:
        assert optim.canonical_choice(name.lower(), OPTIMIZERS) == name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda():
    x, y, body, head = (t.cuda() for t in _toy())
    optimizer = build_optimizer("AdamW", [{"params": list(body.parameters()) + list(head.parameters())}], 1e-2, {})
    assert optimizer.defaults["fused"] is True
    losses = _train(optimizer, None, x, y, body, head)
    assert losses[-1] < 0.8 * losses[0]
