"""Optimizer and LR-scheduler factories by name; optional optimizer libraries are imported only when chosen."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.optim import Optimizer, lr_scheduler
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from traintrain.config_fields import (
    ADAPTIVE_OPTIMIZERS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    canonical_choice,
    own_learning_rate,
    parse_step_rules,
)
from traintrain.errors import TrainTrainError

log = logging.getLogger(__name__)

Scheduler = LRScheduler | ReduceLROnPlateau


@dataclass(frozen=True)
class _Recipe:
    """Where an optimizer class lives ("module:Class", tried in order), what to install, its default kwargs."""

    sources: tuple[str, ...]
    install: str
    defaults: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # torch (fused / foreach), bnb, model (takes a module, not parameter groups)


def _bnb(name: str, **defaults: Any) -> _Recipe:
    return _Recipe((f"bitsandbytes.optim:{name}",), "bitsandbytes", defaults, "bnb")


_NESTEROV = {"nesterov": True, "momentum": 0.9}
_RECIPES: dict[str, _Recipe] = {
    "AdamW": _Recipe(("torch.optim:AdamW",), "torch", kind="torch"),
    "Adam": _Recipe(("torch.optim:Adam",), "torch", kind="torch"),
    "SGDNesterov": _Recipe(("torch.optim:SGD",), "torch", _NESTEROV, "torch"),
    "AdamW8bit": _bnb("AdamW8bit"),
    "Adam8bit": _bnb("Adam8bit"),
    "Lion8bit": _bnb("Lion8bit"),
    "SGDNesterov8bit": _bnb("SGD8bit", **_NESTEROV),
    "PagedAdamW8bit": _bnb("PagedAdamW8bit"),
    "PagedLion8bit": _bnb("PagedLion8bit"),
    "PagedAdamW": _bnb("PagedAdamW"),
    "PagedAdamW32bit": _bnb("PagedAdamW32bit"),
    "AdaFactor": _Recipe(
        ("transformers.optimization:Adafactor",),
        "transformers",
        {"relative_step": True, "scale_parameter": True, "warmup_init": False},
    ),
    "Lion": _Recipe(("lion_pytorch:Lion", "pytorch_optimizer:Lion"), "lion-pytorch"),
    "Prodigy": _Recipe(("prodigyopt:Prodigy",), "prodigyopt"),
    "DadaptAdam": _Recipe(("dadaptation:DAdaptAdam",), "dadaptation"),
    "DadaptLion": _Recipe(("dadaptation:DAdaptLion",), "dadaptation"),
    "DAdaptAdaGrad": _Recipe(("dadaptation:DAdaptAdaGrad",), "dadaptation"),
    "DAdaptAdan": _Recipe(("dadaptation:DAdaptAdan",), "dadaptation"),
    "DAdaptSGD": _Recipe(("dadaptation:DAdaptSGD",), "dadaptation"),
    "RAdamScheduleFree": _Recipe(("schedulefree:RAdamScheduleFree",), "schedulefree"),
    "AdamWScheduleFree": _Recipe(("schedulefree:AdamWScheduleFree",), "schedulefree"),
    "SGDScheduleFree": _Recipe(("schedulefree:SGDScheduleFree",), "schedulefree"),
    "CAME": _Recipe(("pytorch_optimizer:CAME",), "pytorch-optimizer"),
    "Tiger": _Recipe(("pytorch_optimizer:Tiger",), "pytorch-optimizer"),
    "AdamMini": _Recipe(("pytorch_optimizer:AdamMini",), "pytorch-optimizer", kind="model"),
}
_RUN_KWARGS = {"fused", "foreach", "capturable", "differentiable"}  # settings that take the torch choice away
CAPTURABLE_OPTIMIZERS = ("AdamW", "Adam")  # fused + capturable kernels: their step can be replayed in a CUDA graph
# Schedulers that change more than the learning rate each step (momentum / betas), which a CUDA graph would freeze.
_MOMENTUM_SCHEDULERS = (lr_scheduler.CyclicLR, lr_scheduler.OneCycleLR)


def _recipe(name: str) -> tuple[str, _Recipe]:
    display = canonical_choice(name, OPTIMIZERS)
    if display not in _RECIPES:
        raise TrainTrainError(f"Unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}.")
    return display, _RECIPES[display]


def _load_class(display: str, recipe: _Recipe) -> type:
    for source in recipe.sources:
        module_name, attribute = source.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        except Exception as error:  # e.g. a bitsandbytes build that does not match this torch / CUDA
            raise TrainTrainError(
                f"{module_name} is installed but cannot be loaded ({error}): reinstall it to match your torch, "
                f"or choose another optimizer than {display}."
            ) from error
        if not hasattr(module, attribute):
            raise TrainTrainError(f"Your {module_name} has no {attribute}: upgrade it (pip install -U {recipe.install}).")
        return getattr(module, attribute)
    raise TrainTrainError(
        f"The optimizer {display} needs the package {recipe.install}: install it (pip install {recipe.install}) "
        "or choose another optimizer."
    )


def _accepted(target: Callable, fixed: set[str]) -> set[str]:
    """Keyword arguments `target` names explicitly (not through **kwargs), less those the factory sets."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(target).parameters.values() if p.kind in kinds} - fixed


def _check_keys(what: str, name: str, settings: dict[str, Any], accepted: set[str], hint: str = "") -> None:
    unknown = sorted(set(settings) - accepted)
    if unknown:
        offer = ", ".join(sorted(accepted)) or "no settings"
        raise TrainTrainError(f"'{what}': {name} has no setting {', '.join(unknown)} (it takes {offer}).{hint}")


def check_optimizer(name: str, settings: dict[str, Any]) -> None:
    """Raise TrainTrainError now if `name` is unknown, its package is missing, or a setting is not one it takes."""
    _checked_class(name, settings)


def _checked_class(name: str, settings: dict[str, Any]) -> tuple[str, _Recipe, type]:
    display, recipe = _recipe(name)
    if "lr" in settings:
        raise TrainTrainError("Set the learning rate in 'train learning rate', not in 'train optimizer settings'.")
    cls = _load_class(display, recipe)
    _check_keys("train optimizer settings", display, settings, _accepted(cls, {"self", "params", "model", "lr"}))
    return display, recipe, cls


def build_optimizer(
    name: str, param_groups: list[dict], lr: float, settings: dict[str, Any] | None = None, *, capturable: bool = False
) -> Optimizer:
    """The optimizer `name` (case-insensitive) over `param_groups` with `settings` as keyword arguments.

    With `capturable`, AdamW / Adam on CUDA are built so their step can be captured in a CUDA graph: the fused,
    capturable kernel, with each group's learning rate a device tensor the scheduler updates in place."""
    settings = dict(settings or {})
    display, recipe, cls = _checked_class(name, settings)
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise TrainTrainError("Nothing to train: no network module matched. Tick more 'network blocks'.")
    kwargs = {**recipe.defaults, **_torch_choice(recipe, cls, params, settings), **settings}
    kwargs["lr"] = None if own_learning_rate(display, settings) else lr
    if capturable and display in CAPTURABLE_OPTIMIZERS and kwargs.get("fused") and not settings.keys() & _RUN_KWARGS:
        kwargs["capturable"] = True
        device = params[0].device
        kwargs["lr"] = torch.tensor(float(lr), device=device)
        for group in groups:  # one tensor per group: the scheduler fills each in place
            group["lr"] = torch.tensor(float(group.get("lr", lr)), device=device)
    if recipe.kind == "bnb":
        _check_bitsandbytes(params)
    if display in ADAPTIVE_OPTIMIZERS:
        _one_learning_rate(display, groups, lr)
    try:
        if recipe.kind == "model":
            return _adam_mini(cls, groups, kwargs)
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as error:
        raise TrainTrainError(
            f"{display} refused its settings ({error}): check 'train optimizer settings' and 'train learning rate'."
        ) from error


def _torch_choice(recipe: _Recipe, cls: type, params: list[torch.Tensor], settings: dict[str, Any]) -> dict:
    """torch optimizers: the fused kernel when every parameter is on CUDA, else the foreach one."""
    if recipe.kind != "torch" or _RUN_KWARGS & settings.keys():
        return {}
    if all(p.is_cuda for p in params) and "fused" in _accepted(cls, set()):
        return {"fused": True}
    return {"foreach": True}


def _check_bitsandbytes(params: list[torch.Tensor]) -> None:
    import bitsandbytes

    version = tuple(int(n) for n in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if version < (0, 50) and not all(p.is_cuda for p in params):
        raise TrainTrainError(
            f"bitsandbytes {bitsandbytes.__version__} cannot step CPU tensors: upgrade it to 0.50 or later "
            "(it needs torch 2.4+), train on a GPU, or choose AdamW."
        )


def _one_learning_rate(display: str, groups: list[dict], lr: float) -> None:
    """Prodigy / D-Adaptation estimate one step size for all groups: give every group the same multiplier."""
    if lr <= 0.1:
        log.warning("%s scales its own step size by the learning rate: use about 1.0 (now %g).", display, lr)
    if any(group.get("lr", lr) != lr for group in groups):
        log.warning("%s uses one learning rate for all groups: the text encoder learning rate is ignored.", display)
        for group in groups:
            group["lr"] = lr


def _adam_mini(cls: type, groups: list[dict], kwargs: dict[str, Any]) -> Optimizer:
    """AdamMini wants a module: wrap the parameters in one, then restore each group's own settings."""
    holder = torch.nn.Module()
    source: dict[int, dict] = {}
    for index, group in enumerate(groups):
        for number, param in enumerate(group["params"]):
            if not isinstance(param, torch.nn.Parameter):
                raise TrainTrainError("AdamMini needs nn.Parameter weights: choose another optimizer.")
            holder.register_parameter(f"group{index}_{number}", param)
            source[id(param)] = group
    optimizer = cls(holder, **kwargs)
    for group in optimizer.param_groups:
        group.update({k: v for k, v in source[id(group["params"][0])].items() if k != "params"})
    return optimizer


def is_schedule_free(optimizer: Optimizer) -> bool:
    """Schedule-free optimizers need `optimizer.train()` / `.eval()` and no LR scheduler."""
    return type(optimizer).__name__.endswith("ScheduleFree")


def uses_own_schedule(optimizer: Optimizer) -> bool:
    """Adafactor with relative_step computes its own learning rate; its scheduler only reports it."""
    return any(group.get("relative_step") for group in optimizer.param_groups)


def graph_refusal(optimizer: Optimizer, scheduler: Scheduler | None) -> str:
    """Why this optimizer / scheduler pair cannot step inside a CUDA graph; empty when it can."""
    if not optimizer.defaults.get("capturable"):
        return (
            f"{type(optimizer).__name__} cannot step inside a CUDA graph (only fused AdamW / Adam on a GPU can, "
            "without fused / foreach / capturable in 'train optimizer settings')"
        )
    if not all(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
        return "the learning rates are not device tensors"
    if isinstance(scheduler, _MOMENTUM_SCHEDULERS):
        return f"{type(scheduler).__name__} changes the momentum every step"
    return ""


def current_lrs(optimizer: Optimizer) -> list[float | torch.Tensor]:
    """The learning rate each group steps with (schedule-free: the scheduled one; Prodigy/D-Adapt: d × lr).
    A learning rate held as a device tensor (CUDA graphs) comes back as a copy, to read later without a sync now."""
    lrs: list[float | torch.Tensor] = []
    for group in optimizer.param_groups:
        if group.get("relative_step"):
            state = optimizer.state.get(group["params"][0], {})
            lrs.append(float(type(optimizer)._get_lr(group, state)) if "step" in state else 0.0)
        elif "scheduled_lr" in group and group.get("k", 0) > 0:
            lrs.append(float(group["scheduled_lr"]))
        elif isinstance(group["lr"], torch.Tensor):
            lrs.append(group["lr"].detach().clone())
        else:
            lrs.append(float(group["lr"]) * float(group.get("d", 1.0)))
    return lrs


def needs_metric(scheduler: Scheduler | None) -> bool:
    """Whether the loop must call `scheduler.step(loss)` (reduce_on_plateau) instead of `scheduler.step()`."""
    return isinstance(scheduler, ReduceLROnPlateau)


# Settings each diffusers-style schedule takes besides the dedicated fields (warmup, cycles, power, step rules).
_LAMBDA_SETTINGS = {"polynomial": {"lr_end"}}
# torch schedulers: class name, default kwargs (from the iteration count), kwargs the factory sets.
_TORCH_SCHEDULES: dict[str, tuple[str, Callable[[int], dict[str, Any]], set[str]]] = {
    "cosine_annealing": ("CosineAnnealingLR", lambda n: {"T_max": n}, set()),
    "cosine_annealing_with_restarts": ("CosineAnnealingWarmRestarts", lambda n: {"T_0": 10}, set()),
    "exponential": ("ExponentialLR", lambda n: {"gamma": 0.9}, set()),
    "step": ("StepLR", lambda n: {"step_size": 10}, set()),
    "multi_step": ("MultiStepLR", lambda n: {"milestones": [30, 60, 90]}, set()),
    "reduce_on_plateau": ("ReduceLROnPlateau", lambda n: {"mode": "min"}, set()),
    "cyclic": ("CyclicLR", lambda n: {"base_lr": 1e-5, "max_lr": 1e-3}, set()),
    "one_cycle": ("OneCycleLR", lambda n: {"max_lr": 1e-3, "total_steps": n}, {"total_steps", "epochs", "steps_per_epoch"}),
}


def check_scheduler(name: str, settings: dict[str, Any], step_rules: str = "") -> None:
    """Raise TrainTrainError now if `name` is unknown or a setting is not one that scheduler takes."""
    name = canonical_choice(name, LR_SCHEDULERS)
    if name not in LR_SCHEDULERS:
        raise TrainTrainError(f"Unknown LR scheduler {name!r}: choose one of {', '.join(LR_SCHEDULERS)}.")
    if name in _TORCH_SCHEDULES:
        class_name, _, fixed = _TORCH_SCHEDULES[name]
        accepted = _accepted(getattr(lr_scheduler, class_name), fixed | {"optimizer", "last_epoch", "verbose"})
        _check_keys("train lr scheduler settings", name, settings, accepted)
        return
    hint = " Warmup, cycles, power and step rules have their own fields."
    _check_keys("train lr scheduler settings", name, settings, _LAMBDA_SETTINGS.get(name, set()), hint)
    if name == "piecewise_constant":
        parse_step_rules(step_rules)


def build_scheduler(
    name: str,
    optimizer: Optimizer,
    *,
    iterations: int,
    warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    step_rules: str = "",
    settings: dict[str, Any] | None = None,
) -> Scheduler | None:
    """The LR scheduler `name` for `iterations` steps; None for schedule-free optimizers (they schedule themselves)."""
    settings = dict(settings or {})
    if is_schedule_free(optimizer):
        log.info("%s schedules its own learning rate: the LR scheduler %s is not used.", type(optimizer).__name__, name)
        return None
    if uses_own_schedule(optimizer):
        from transformers.optimization import AdafactorSchedule

        log.info("Adafactor with relative_step sets its own learning rate: the LR scheduler %s is not used.", name)
        return AdafactorSchedule(optimizer)
    check_scheduler(name, settings, step_rules)
    name = canonical_choice(name, LR_SCHEDULERS)
    if name in _TORCH_SCHEDULES:
        return _torch_scheduler(name, optimizer, iterations, settings)
    factors = [
        _lambda_factor(name, iterations, warmup_steps, num_cycles, power, step_rules, float(group["lr"]), settings)
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, factors)


def _torch_scheduler(name: str, optimizer: Optimizer, iterations: int, settings: dict[str, Any]) -> Scheduler:
    class_name, defaults, _ = _TORCH_SCHEDULES[name]
    kwargs = {**defaults(iterations), **settings}
    if name in ("cyclic", "one_cycle"):
        kwargs.setdefault("cycle_momentum", bool({"momentum", "betas"} & optimizer.defaults.keys()))
    try:
        return getattr(lr_scheduler, class_name)(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as error:
        raise TrainTrainError(f"The LR scheduler {name} refused its settings ({error}): check them.") from error


def _lambda_factor(
    name: str, iterations: int, warmup: int, cycles: int, power: float, rules_text: str, lr: float, settings: dict
) -> Callable[[int], float]:
    """The diffusers-style schedule as an lr multiplier per step: a linear warmup, then the schedule."""
    span = max(1, iterations - warmup)

    def progress(step: int) -> float:
        return min(1.0, max(0.0, (step - warmup) / span))

    schedule = _decay(name, progress, cycles, power, rules_text, lr, settings)

    def factor(step: int) -> float:
        return step / max(1, warmup) if step < warmup else schedule(step)

    return factor


def _decay(
    name: str, progress: Callable[[int], float], cycles: int, power: float, rules_text: str, lr: float, settings: dict
) -> Callable[[int], float]:
    """The multiplier after the warmup (formulas as in diffusers' schedulers)."""
    if name == "linear":
        return lambda step: 1.0 - progress(step)
    if name == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * progress(step)))
    if name == "cosine_with_restarts":
        return lambda step: (
            0.0 if progress(step) >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress(step)) % 1.0)))
        )
    if name == "polynomial":
        lr_end = settings.get("lr_end", 1e-7)
        if not lr > lr_end:
            raise TrainTrainError(f"polynomial needs lr_end ({lr_end}) below the learning rate ({lr}): lower it.")
        return lambda step: ((lr - lr_end) * (1.0 - progress(step)) ** power + lr_end) / lr
    if name == "piecewise_constant":
        rules, last = parse_step_rules(rules_text)
        return lambda step: next((multiplier for multiplier, until in rules if step < until), last)
    return lambda step: 1.0  # constant, constant_with_warmup


# What a constructor or a first scheduler step raises for values of the wrong type or range ("betas=(2, 3, 4)").
_REFUSALS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError, OverflowError, ZeroDivisionError)
TRIAL_STEPS = 3


def trial_problem(
    name: str, settings: dict[str, Any], lr: float, scheduler: str, scheduler_settings: dict[str, Any], **schedule: Any
) -> str:
    """Build the optimizer and scheduler on one CPU parameter and step them a few times, before any model loads: the
    sentence saying what a setting's value gets wrong, or "". `schedule` takes `build_scheduler`'s keywords."""
    try:
        if _recipe(name)[1].kind == "bnb":  # needs its GPU kernels: its keys are checked, its values at the start
            check_optimizer(name, settings)
            check_scheduler(scheduler, scheduler_settings, schedule.get("step_rules", ""))
            return ""
        weight = torch.nn.Parameter(torch.zeros(2))
        optimizer = build_optimizer(name, [{"params": [weight]}], lr, settings)
        built = build_scheduler(scheduler, optimizer, settings=scheduler_settings, **schedule)
        _step_a_few_times(optimizer, built, weight)
    except TrainTrainError as error:
        return str(error)
    except _REFUSALS as error:
        return (
            f"{name} with {scheduler} refused the settings ({type(error).__name__}: {error}): check 'train optimizer "
            "settings' and 'train lr scheduler settings'."
        )
    return ""


def _step_a_few_times(optimizer: Optimizer, scheduler: Scheduler | None, weight: torch.nn.Parameter) -> None:
    if is_schedule_free(optimizer):
        optimizer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "scheduler.step() before optimizer.step()": harmless here
        for _ in range(TRIAL_STEPS):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
            if needs_metric(scheduler):
                scheduler.step(1.0)
            elif scheduler is not None:
                scheduler.step()
