"""Every check that needs no model, in one message: the settings, the optimizer and scheduler tried on one CPU
weight, and (where models are files) the model and VAE paths. Runs before any model work."""

from __future__ import annotations

from traintrain.config import FIELD_BY_NAME, TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.files import is_dir, is_file
from traintrain.models.open import TINY_MODELS
from traintrain.optim import trial_problem

OPTIMIZER_FIELDS = frozenset(
    {"train_optimizer", "train_optimizer_settings", "train_learning_rate", "train_lr_scheduler",
     "train_lr_scheduler_settings", "train_lr_step_rules", "train_lr_warmup_steps", "train_lr_scheduler_num_cycles",
     "train_lr_scheduler_power", "train_iterations"}
)  # fmt: skip


def settings_problems(
    config: TrainConfig, *, model_files: bool = False, unreadable: frozenset[str] = frozenset()
) -> list[str]:
    """Every problem found without a model, one sentence each. `model_files`: the model and VAE are paths (standalone,
    CLI) and must exist; `unreadable`: fields whose typed value could not be read (their checks are skipped)."""
    found = config.problems(unreadable)
    for prefix, settings in (("", config), ("2nd pass: ", config.second_pass)):
        own = [p for p in found if p.startswith("2nd pass: ") == bool(prefix)]
        if settings is None or unreadable & OPTIMIZER_FIELDS or any(map(_about_the_optimizer, own)):
            continue  # the optimizer is tried once its own fields are right
        problem = _optimizer_problem(settings)
        if problem and problem not in found and prefix + problem not in found:
            found.append(prefix + problem)
    if model_files:
        found += _path_problems(config, unreadable)
    return found


def check_before_model(config: TrainConfig, *, model_files: bool = False) -> None:
    """Raise one TrainTrainError listing every problem `settings_problems` finds."""
    raise_problems(settings_problems(config, model_files=model_files))


def raise_problems(problems: list[str]) -> None:
    """The one message format of setting problems (nothing when the list is empty)."""
    if problems:
        raise TrainTrainError("Please fix these settings:\n" + "\n".join(f"- {p}" for p in problems))


def _about_the_optimizer(problem: str) -> bool:
    """Whether `problem` names one of the optimizer's fields (then trying the optimizer would only repeat it)."""
    return any(f"'{FIELD_BY_NAME[name].label}'" in problem for name in OPTIMIZER_FIELDS)


def _optimizer_problem(c: TrainConfig) -> str:
    return trial_problem(
        c.train_optimizer, c.train_optimizer_settings, c.train_learning_rate, c.train_lr_scheduler,
        c.train_lr_scheduler_settings, iterations=c.train_iterations, warmup_steps=c.train_lr_warmup_steps,
        num_cycles=c.train_lr_scheduler_num_cycles, power=c.train_lr_scheduler_power, step_rules=c.train_lr_step_rules,
    )  # fmt: skip


def _path_problems(config: TrainConfig, unreadable: frozenset[str]) -> list[str]:
    found = []
    model = config.model.strip()
    if "model" not in unreadable and model and model not in TINY_MODELS and not (is_file(model) or is_dir(model)):
        found.append(f"'Model' {model!r} is not a checkpoint file or a diffusers folder: check the path.")
    if "vae" not in unreadable and config.vae.strip() and not is_file(config.vae):
        found.append(f"'VAE' {config.vae!r} is not a file: give the path of a VAE or leave it empty.")
    return found
