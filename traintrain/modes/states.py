"""Saved training states of a run: where they are written (`logs/states/`), and loading one to resume from."""

from __future__ import annotations

import logging
from pathlib import Path

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.files import free_path, output_path
from traintrain.train_state import TrainingState, load_state, read_state_metadata, save_state

log = logging.getLogger(__name__)

STATE_SUFFIX = "-state.safetensors"


class StateWriter:
    """Writes `<stem><suffix>-state.safetensors` into `folder` (never replacing a file unless overwrite is on)."""

    def __init__(self, folder: Path, stem: str, overwrite: bool) -> None:
        self.folder, self.stem, self.overwrite = Path(folder), stem, overwrite
        self.saved: list[Path] = []

    def __call__(self, suffix: str, state: TrainingState) -> Path:
        """Save `state` under the LoRA save's suffix (`_100steps`, `-step42`, or "" at the end)."""
        stem = self.stem + suffix
        if self.overwrite:
            path = output_path(self.folder, stem, STATE_SUFFIX, overwrite=True)
        else:
            path = free_path(self.folder, stem, STATE_SUFFIX)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_state(path, state)
        self.saved.append(path)
        log.info("Saved the training state %s", path)
        return path


def adopt_state_seed(config: TrainConfig) -> None:
    """A resumed run draws from the state's seed: taken over for seed -1, refused when another seed is set."""
    if not config.resume_training_state.strip():
        return
    seed = int(read_state_metadata(Path(config.resume_training_state))["seed"])
    if config.train_seed == -1:
        config._seed = seed
    elif config.train_seed != seed:
        raise TrainTrainError(
            f"The training state was trained with seed {seed}: set 'train seed' to {seed} (or -1) to resume it."
        )


def state_to_resume(config: TrainConfig) -> TrainingState | None:
    """The state named by `resume training state`, refused when it is already at or past `train iterations`."""
    if not config.resume_training_state.strip():
        return None
    state = load_state(Path(config.resume_training_state))
    if state.step >= config.train_iterations:
        raise TrainTrainError(
            f"The training state is at step {state.step}, not below 'train iterations' {config.train_iterations}: "
            "raise train iterations to train on."
        )
    return state
