"""Presets (`presets/<name>.json`) and saved settings (`jsons/**/<name>.json`): list, load and save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from traintrain.config import TrainConfig
from traintrain.config_compat import normalised, with_notes
from traintrain.errors import TrainTrainError
from traintrain.files import inside, is_file, plain_name
from traintrain.ui.handlers import shows_errors
from traintrain.ui.open_folder import desktop_available, open_folder
from traintrain.ui.inputs import flag, text
from traintrain.ui.params import ParamsPanel


def preset_names(presets_dir: Path) -> list[str]:
    """The preset names (file stems), sorted."""
    folder = Path(presets_dir)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


SHIPPED_LIST = Path(__file__).resolve().parents[2] / "presets" / "shipped.txt"  # one shipped preset name a line


def shipped_presets() -> frozenset[str]:
    """The (case-folded) names of the presets that come with TrainTrain: no user preset may replace them."""
    lines = SHIPPED_LIST.read_text(encoding="utf-8").splitlines() if SHIPPED_LIST.is_file() else []
    return frozenset(line.strip().casefold() for line in lines if line.strip())


def save_preset(presets_dir: Path, config: TrainConfig, overwrite: bool = False) -> Path:
    """Write `presets/<save lora name>.json` (sanitized; "untitled" when empty); an existing preset is replaced only
    with `overwrite`, a shipped one never."""
    name = config.effective_name
    if name.casefold() in shipped_presets():
        raise TrainTrainError(f"{name!r} is a preset that comes with TrainTrain: change 'save lora name' to save yours.")
    path = inside(Path(presets_dir), f"{name}.json")
    if is_file(path) and not overwrite:
        raise TrainTrainError(f"The preset {name!r} exists: tick 'Overwrite preset' to replace it, or change 'save lora name'.")
    return config.save_json(path)


def load_preset(presets_dir: Path, name: str) -> TrainConfig:
    """Read the preset `name`."""
    if not name:
        raise TrainTrainError("Choose a preset first.")
    path = inside(Path(presets_dir), f"{_plain(name)}.json")
    if not is_file(path):
        raise TrainTrainError(f"No preset {name!r} in {presets_dir}: press refresh to update the list.")
    return TrainConfig.load_json(path)


def find_saved_json(jsons_dir: Path, name: str) -> Path:
    """The newest `<name>.json` anywhere under `jsons/` (".json" optional)."""
    stem = _plain(name.strip().removesuffix(".json"))
    matches = list(Path(jsons_dir).rglob(f"{stem}.json")) if Path(jsons_dir).is_dir() else []
    if not matches:
        raise TrainTrainError(f"No {stem}.json under {jsons_dir}: copy the name of a saved settings file.")
    return max(matches, key=lambda p: p.stat().st_mtime)


def _plain(name: str) -> str:
    return plain_name(name, "give a name without folders or wildcards.")


class PresetsPanel:
    """Preset dropdown with load / save / refresh, and a box to load settings saved in `jsons/`."""

    def __init__(self, presets_dir: Path, jsons_dir: Path) -> None:
        self.presets_dir, self.jsons_dir = Path(presets_dir), Path(jsons_dir)
        self.params: ParamsPanel | None = None
        with gr.Row():
            self.preset = gr.Dropdown(preset_names(self.presets_dir), label="Preset", elem_id="tt_preset", scale=3)
            self.load_button = gr.Button("Load preset", elem_id="tt_preset_load", scale=1)
            self.save_button = gr.Button("Save preset", elem_id="tt_preset_save", scale=1)
            self.overwrite = gr.Checkbox(False, label="Overwrite preset", elem_id="tt_preset_overwrite", scale=1)
            self.refresh_button = gr.Button(
                "↻", elem_id="tt_preset_refresh", elem_classes=["tt-tool"], scale=0, min_width=40
            )
            self.json_name = gr.Textbox(label="Saved settings name (jsons/)", elem_id="tt_json_name", scale=3)
            self.open_button = gr.Button(
                "📂", elem_id="tt_json_open", elem_classes=["tt-tool"], scale=0, min_width=40,
                visible=desktop_available(),
            )  # fmt: skip
            self.json_button = gr.Button("Load settings", elem_id="tt_json_load", scale=1)

    def connect(self, params: ParamsPanel, message: Any) -> None:
        """Wire the buttons to the parameter panel (built below this row) and the message box."""
        self.params = params
        settings = params.inputs
        self.load_button.click(
            shows_errors(self.load, len(settings)), inputs=[self.preset], outputs=[*settings, message]
        )
        self.json_button.click(
            shows_errors(self.load_json, len(settings)), inputs=[self.json_name], outputs=[*settings, message]
        )
        self.save_button.click(
            shows_errors(self.save, 1), inputs=[self.overwrite, *settings], outputs=[self.preset, message]
        )
        self.refresh_button.click(lambda: gr.update(choices=preset_names(self.presets_dir)), outputs=[self.preset])
        self.open_button.click(shows_errors(lambda: open_folder(self.jsons_dir)), outputs=[message])

    def load(self, name: str) -> list[Any]:
        """Widget values of the preset (the original's values corrected), then the message with the notes."""
        name = text(name, "Preset")
        config, notes = normalised(load_preset(self.presets_dir, name))
        return [*self.params.show(config), with_notes(f"Loaded preset {name}.", notes)]

    def load_json(self, name: str) -> list[Any]:
        """Widget values of a saved settings file (the original's values corrected), then the message."""
        path = find_saved_json(self.jsons_dir, text(name, "Saved settings name"))
        config, notes = normalised(TrainConfig.load_json(path))
        return [*self.params.show(config), with_notes(f"Loaded {path}.", notes)]

    def save(self, overwrite: Any, *values: Any) -> tuple[Any, str]:
        """Save the current settings as a preset (touches nothing else: the queue stays as it is)."""
        config = self.params.read(values)
        path = save_preset(self.presets_dir, config, flag(overwrite, "Overwrite preset"))
        return gr.update(choices=preset_names(self.presets_dir), value=path.stem), f"Preset saved: {path}"
