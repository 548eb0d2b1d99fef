"""The shipped presets load, carry the original's values, and the advice on known-bad combinations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from traintrain.config import TrainConfig
from traintrain.modes import advice

PRESETS = Path(__file__).resolve().parents[1] / "presets"


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.json")), ids=lambda p: p.stem)
def test_preset_loads_without_unknown_keys(path: Path) -> None:
    config = TrainConfig.load_json(path)
    assert config.unknown_keys == ()
    assert TrainConfig.from_json_dict(config.to_json_dict()) == config


def test_expected_presets_and_values() -> None:
    names = {p.stem for p in PRESETS.glob("*.json")}
    assert {"LoRA", "iLECO", "Difference", "Difference_Use2ndPass"} <= names
    lora = TrainConfig.load_json(PRESETS / "LoRA.json")
    assert (lora.mode, lora.network_rank, lora.network_alpha, lora.train_learning_rate) == ("LoRA", 16, 8.0, 1e-4)
    ileco = TrainConfig.load_json(PRESETS / "iLECO.json")
    assert (ileco.mode, ileco.network_rank, ileco.network_alpha, ileco.train_iterations) == ("iLECO", 4, 8.0, 300)
    two = TrainConfig.load_json(PRESETS / "Difference_Use2ndPass.json")
    assert two.use_2nd_pass_settings and two.network_rank == 16
    assert (two.second_pass.network_rank, two.second_pass.train_learning_rate) == (4, 1e-4)
    action = TrainConfig.load_json(PRESETS / "ADDifT_Action_SD1.5.json")
    assert (action.train_min_timesteps, action.train_max_timesteps, action.train_optimizer) == (500, 1000, "CAME")


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.json")), ids=lambda p: p.stem)
def test_preset_names_its_lora_as_the_original(path: Path) -> None:
    """The original saved each preset with the preset button, so its save name is the preset's (never untitled)."""
    expected = {"ADDifT_Action_XL": "ADDifT_Action_SDXL", "ADDifT_Style_XL": "ADDifT_Style_SDXL"}
    assert TrainConfig.load_json(path).save_lora_name == expected.get(path.stem, path.stem)


def test_adamw8bit_with_difference_is_advised_against() -> None:
    difference = TrainConfig.load_json(PRESETS / "Difference.json")
    assert advice(difference) == []
    notes = advice(dataclasses.replace(difference, train_optimizer="AdamW8bit"))
    assert len(notes) == 1 and "does not work well" in notes[0]
    assert advice(dataclasses.replace(TrainConfig(), train_optimizer="AdamW8bit")) == []
