"""The parameter panel, generated from the FieldSpec table: mode, model, prompts, images, both passes' settings."""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
from PIL import Image

from traintrain.config import FIELD_BY_NAME, FIELDS, TrainConfig
from traintrain.config_fields import (
    CHECKBOX,
    CHECKBOXGROUP,
    DROPDOWN,
    IMAGE,
    RADIO,
    SECOND_PASS_CODE,
    TEXTAREA,
    FieldSpec,
)
from traintrain.errors import TrainTrainError
from traintrain.files import atomic_path, is_file
from traintrain.preflight import raise_problems, settings_problems
from traintrain.ui.compat import image_input

Choices = Callable[[], list[str]]
SECOND_PREFIX = "2nd pass: "
FIRST_ID, SECOND_ID = "tt_", "tt_2nd_"  # elem_id prefixes of the two passes' widgets
IMAGE_FOLDER = Path(tempfile.gettempdir()) / "traintrain-images"
_MODE_CODES = {"L", "I", "D", "A", "M"}


def _first_pass_specs() -> list[FieldSpec]:
    return [s for s in FIELDS if s.section == "general" or _MODE_CODES.intersection(s.shown_in)]


def _second_pass_specs() -> list[FieldSpec]:
    return [s for s in FIELDS if SECOND_PASS_CODE in s.shown_in]


class ParamsPanel:
    """Every setting widget; `inputs` lists them in the order `read` takes and `show` returns values."""

    def __init__(
        self, model_choices: Choices, vae_choices: Choices, below_prompts: Callable[[], object] | None = None
    ) -> None:
        """`below_prompts` builds what goes right under the prompts (iLECO's preview buttons)."""
        self.first: dict[str, Any] = {}
        self.second: dict[str, Any] = {}
        self._choices = {"model": model_choices, "vae": vae_choices}
        self._general_row()
        with gr.Row():
            self._add(self.first, ["original_prompt", "target_prompt", "negative_prompt"])
        if below_prompts is not None:
            below_prompts()
        with gr.Row():
            self._add(self.first, ["original_image", "target_image"])
        self._pass_layout(
            self.first, [s for s in _first_pass_specs() if s.section not in ("general", "prompts", "images")]
        )
        with gr.Accordion("2nd pass", open=False, visible=False, elem_id="tt_2nd_pass") as self.second_accordion:
            with gr.Row():
                self._add(self.second, ["use_2nd_pass_settings"], SECOND_ID)
                self.copy_button = gr.Button("Copy settings from 1st pass", elem_id="tt_copy_1st_pass", scale=0)
            self._pass_layout(
                self.second, [s for s in _second_pass_specs() if s.name != "use_2nd_pass_settings"], SECOND_ID
            )
        self.mode = self.first["mode"]
        self.mode.change(self.visibility, inputs=[self.mode], outputs=self.visibility_outputs)
        copied = [name for name in self.second if name in self.first]
        self.copy_button.click(
            lambda *values: list(values),
            inputs=[self.first[n] for n in copied],
            outputs=[self.second[n] for n in copied],
        )

    # ----- layout

    def _general_row(self) -> None:
        with gr.Row(elem_classes=["tt-general"]):
            with gr.Column(scale=3, min_width=300):
                self._add(self.first, ["mode"])
            for name in ("model", "vae"):
                with gr.Column(scale=2, min_width=200):
                    with gr.Row():
                        self._add(self.first, [name])
                        refresh = gr.Button(
                            "↻", elem_id=f"tt_refresh_{name}", elem_classes=["tt-tool"], scale=0, min_width=40
                        )
                refresh.click(self._refresh(name), outputs=[self.first[name]])

    def _pass_layout(self, widgets: dict[str, Any], specs: list[FieldSpec], prefix: str = FIRST_ID) -> None:
        """The Required columns, the block row and the Option columns of one pass."""
        required = "Required Parameters" + ("(+prompt in iLECO, +images in Difference)" if prefix == FIRST_ID else "")
        for section, title in (("required", required), ("blocks", ""), ("options", "Option Parameters")):
            chosen = [s for s in specs if s.section == section]
            if title:
                gr.HTML(f'<p class="tt-section-title">{title}</p>')
            with gr.Row(elem_classes=["tt-params"]):
                for column in sorted({s.column for s in chosen}):
                    with gr.Column(min_width=200):
                        self._add(widgets, [s.name for s in chosen if s.column == column], prefix)

    def _add(self, widgets: dict[str, Any], names: list[str], prefix: str = FIRST_ID) -> None:
        """Widgets for `names`; pass-1 ones start as LoRA mode shows them, pass-2 ones live in their accordion."""
        for name in names:
            spec = FIELD_BY_NAME[name]
            visible = prefix != FIRST_ID or spec.section == "general" or spec.shown("LoRA")
            widgets[name] = self._widget(spec, prefix + name, visible)

    def _widget(self, spec: FieldSpec, elem_id: str, visible: bool) -> Any:
        common: dict[str, Any] = {"label": spec.label, "elem_id": elem_id, "visible": visible}
        if spec.widget == IMAGE:
            return image_input(spec.label, elem_id, visible=visible)
        if spec.help:
            common["info"] = spec.help
        if spec.widget == DROPDOWN:
            choices = self._choices[spec.name]() if spec.name in self._choices else [spec.raw(c) for c in spec.choices]
            return gr.Dropdown(choices=choices, value=spec.raw(spec.default), allow_custom_value=True, **common)
        if spec.widget == CHECKBOX:
            return gr.Checkbox(value=spec.default, **common)
        if spec.widget == CHECKBOXGROUP:
            return gr.CheckboxGroup(choices=list(spec.choices), value=list(spec.default), **common)
        if spec.widget == RADIO:
            return gr.Radio(choices=list(spec.choices), value=spec.default, **common)
        lines = 3 if spec.widget == TEXTAREA else 2 if spec.type is dict else 1
        return gr.Textbox(value=spec.raw(spec.default), lines=lines, **common)

    def _refresh(self, name: str) -> Callable[[], Any]:
        return lambda: gr.update(choices=self._choices[name]())

    # ----- values

    @property
    def inputs(self) -> list[Any]:
        """Pass-1 widgets, then pass-2 widgets."""
        return [*self.first.values(), *self.second.values()]

    @property
    def visibility_outputs(self) -> list[Any]:
        """What a mode change shows or hides."""
        return [*self.first.values(), self.second_accordion]

    def visibility(self, mode: str) -> list[Any]:
        """Updates showing the widgets of `mode` (the 2nd-pass accordion in Difference only); an unknown mode shows
        the general row only."""
        mode = mode if isinstance(mode, str) else ""
        shown = [FIELD_BY_NAME[n].section == "general" or FIELD_BY_NAME[n].shown(mode) for n in self.first]
        return [gr.update(visible=v) for v in shown] + [gr.update(visible=mode == "Difference")]

    def read(self, values: Sequence[Any]) -> TrainConfig:
        """The TrainConfig of the widget values (in `inputs` order). When some cannot be read, one TrainTrainError
        lists them and every other problem of the settings (ranges, optimizer, …): one round of fixes, not two."""
        if len(values) != len(self.inputs):
            raise TrainTrainError(f"Expected {len(self.inputs)} setting values, got {len(values)}: reload the page.")
        count = len(self.first)
        problems: list[str] = []
        first = _parse(dict(zip(self.first, values[:count])), problems, "")
        second = _parse(dict(zip(self.second, values[count:])), problems, SECOND_PREFIX)
        unreadable = frozenset(self.first.keys() - first.keys() | self.second.keys() - second.keys())
        first["use_2nd_pass_settings"] = second.pop("use_2nd_pass_settings", False)
        second_pass = TrainConfig(**{**first, **second}) if first.get("mode") == "Difference" else None
        config = TrainConfig(**first, second_pass=second_pass)
        if problems:
            raise_problems(problems + settings_problems(config, unreadable=unreadable))
        return config

    def show(self, config: TrainConfig) -> list[Any]:
        """Widget values (in `inputs` order) showing `config`."""
        second = config.second_pass or config
        values = [_raw(FIELD_BY_NAME[name], getattr(config, name)) for name in self.first]
        for name in self.second:
            source = config if name == "use_2nd_pass_settings" else second  # the flag lives on the 1st pass
            values.append(_raw(FIELD_BY_NAME[name], getattr(source, name)))
        return values


def _parse(raw: dict[str, Any], problems: list[str], prefix: str) -> dict[str, Any]:
    typed = {}
    for name, value in raw.items():
        spec = FIELD_BY_NAME[name]
        try:
            typed[name] = spec.parse(_image_path(value) if spec.widget == IMAGE else value)
        except TrainTrainError as error:
            problems.append(prefix + str(error))
    return typed


def _raw(spec: FieldSpec, value: Any) -> Any:
    if spec.widget != IMAGE:
        return spec.raw(value)
    if not is_file(value or ""):
        return None
    try:
        with Image.open(value) as image:
            return image.convert("RGBA")
    except (OSError, Image.DecompressionBombError) as error:
        raise TrainTrainError(f"Cannot open the image {value}: {error}. Choose it again.") from error


def _image_path(image: Image.Image | None) -> str:
    """An uploaded image as a PNG file named by its content (so the queue can keep it); "" when none."""
    if image is None:
        return ""
    if not isinstance(image, Image.Image):
        raise TrainTrainError("An image box sent something that is not an image: choose the image again.")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = IMAGE_FOLDER / f"{hashlib.sha256(data).hexdigest()[:24]}.png"
    if not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    return str(path)
