"""The choices of every setting, the FieldSpec table type, and the text formats of setting values.

A value has three forms: typed (in TrainConfig), raw (what a UI widget holds and what the settings JSON stores:
strings for textboxes and dropdowns, booleans for checkboxes, a list for the blocks), and text for the two
"settings" boxes (`key=value` per line or `;`-separated, values as Python literals, never evaluated).
"""

from __future__ import annotations

import ast
import keyword
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

from traintrain.errors import TrainTrainError

MODES = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
# "Shown in" codes: one per mode, plus P2 = the Difference 2nd-pass panel.
MODE_CODES = {"LoRA": "L", "iLECO": "I", "Difference": "D", "ADDifT": "A", "Multi-ADDifT": "M"}
SECOND_PASS_CODE = "P2"

NETWORK_TYPES = ("lierla", "c3lier", "loha")
RANK_CHOICES = tuple(2**i for i in range(2, 11))  # 4 … 1024
ALPHA_CHOICES = tuple(2.0**i for i in range(-5, 11))  # 0.03125 … 1024
CONV_RANK_CHOICES = (0, *RANK_CHOICES)  # 0 = network rank
CONV_ALPHA_CHOICES = (0.0, *ALPHA_CHOICES)  # 0 = network alpha
ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
BLOCKS_SD = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_SDXL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BUCKET_STEPS = tuple(range(64, 577, 64))  # 0 is not offered: it made the original's bucket search loop forever
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy",
    "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD",
    "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit",
    "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
    "CAME", "Tiger", "AdamMini", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov", "Adam",
)  # fmt: skip
# Optimizers that estimate their own step size: the learning rate is a multiplier of it (use about 1.0).
ADAPTIVE_OPTIMIZERS = ("Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD")
LR_SCHEDULERS = (
    "cosine", "linear", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "piecewise_constant", "cosine_annealing", "cosine_annealing_with_restarts", "exponential", "step",
    "multi_step", "reduce_on_plateau", "cyclic", "one_cycle",
)  # fmt: skip
LOSS_FUNCTIONS = ("MSE", "L1", "Smooth-L1")
MODEL_PRECISIONS = ("model", "fp32", "bf16", "fp16", "int8")  # int8: torchao weight-only UNet (models/int8.py)
LORA_PRECISIONS = ("fp32", "bf16", "fp16")
SAVE_PRECISIONS = ("model", "fp32", "bf16", "fp16")
VAE_PRECISIONS = ("fp32", "bf16", "fp16")

# Widget kinds of the FieldSpec table.
DROPDOWN, TEXTBOX, CHECKBOX, CHECKBOXGROUP = "dropdown", "textbox", "checkbox", "checkboxgroup"
RADIO, TEXTAREA, IMAGE = "radio", "textarea", "image"

_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
NAME_LIMIT = 120  # characters of a sanitized file name (and at most 180 UTF-8 bytes)
_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³])", re.IGNORECASE)


def sanitize_name(name: str) -> str:
    """A file-name stem that is safe on every OS and stays inside its folder; never empty ("untitled").

    Path separators, Windows-forbidden and control characters become "_", runs of dots one dot, leading and trailing
    dots/spaces go, Windows device names (CON, COM1.txt, …) get a "_" prefix, and the length is capped.
    """
    text = "".join(
        "_" if char in '<>:"/\\|?*' or unicodedata.category(char) in ("Cc", "Cf", "Cs") else char for char in str(name)
    )
    text = re.sub(r"\.{2,}", ".", text)[:NAME_LIMIT]
    while len(text.encode("utf-8")) > 180:
        text = text[:-1]
    text = text.strip(" .")
    if _RESERVED.fullmatch(text.split(".")[0].rstrip()):
        text = "_" + text
    return text or "untitled"


def canonical_choice(value: str, choices: tuple) -> str:
    """`value` spelled as in `choices` when it matches one case-insensitively, else unchanged."""
    folded = value.strip().lower()
    return next((c for c in choices if isinstance(c, str) and c.lower() == folded), value)


def own_learning_rate(optimizer: str, settings: dict[str, Any]) -> bool:
    """Whether the optimizer ignores the learning rate: Adafactor with relative_step (its default)."""
    return canonical_choice(optimizer, OPTIMIZERS) == "AdaFactor" and bool(settings.get("relative_step", True))


def _is_key(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)


def parse_settings_text(text: str) -> dict[str, Any]:
    """`key=value` items (per line or `;`-separated) → dict; values are Python literals or bare words."""
    settings: dict[str, Any] = {}
    for item in _split_items(text):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not _is_key(key):
            raise TrainTrainError(f"{item!r} is not key=value: write e.g. weight_decay=0.01, one per line or ';'-separated.")
        if key in settings:
            raise TrainTrainError(f"{key} is set twice in the settings: keep one.")
        settings[key] = _literal(key, value)
    return settings


def settings_text(settings: dict[str, Any]) -> str:
    """The inverse of parse_settings_text: one `key=repr(value)` per line."""
    return "\n".join(f"{key}={value!r}" for key, value in settings.items())


def parse_step_rules(text: str) -> tuple[tuple[tuple[float, int], ...], float]:
    """diffusers step rules "1:3,0.5:6,0.1" → (((1.0, 3), (0.5, 6)), 0.1): multiplier until step, then the last."""
    hint = f"'train lr step rules' {text!r}: write multiplier:step pairs and a final multiplier, e.g. 1:3,0.5:6,0.1."
    parts = [part.strip() for part in text.split(",")]
    try:
        rules = tuple((float(m), int(s)) for m, s in (part.split(":") for part in parts[:-1]))
        last = float(parts[-1])
    except ValueError:
        raise TrainTrainError(hint) from None
    steps = [step for _, step in rules]
    multipliers = [m for m, _ in rules] + [last]
    if any(s < 1 for s in steps) or steps != sorted(set(steps)) or not all(map(math.isfinite, multipliers)):
        raise TrainTrainError(hint + " Steps must be positive and increasing.")
    return rules, last


def _split_items(text: str) -> list[str]:
    """Split on `;` and newlines outside quotes and brackets."""
    items, current, depth, quote, escaped = [], [], 0, "", False
    for char in text:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char in ";\n" and depth <= 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _literal(key: str, value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if _BARE_WORD.fullmatch(value):
            return value
    raise TrainTrainError(
        f"{key}={value}: the value must be a number, True/False/None, a 'quoted string', a tuple or a list."
    )


def _number_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def _parse_int(raw: Any) -> int:
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if re.fullmatch(r"[+-]?\d+\.0*", text):
            return int(float(text))
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise ValueError(f"expected a whole number, got {_short(raw)}")


def _parse_float(raw: Any) -> float:
    try:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
    except OverflowError:
        raise ValueError(f"{_short(raw)} is too large a number") from None
    except ValueError:
        pass
    raise ValueError(f"expected a number, got {_short(raw)}")


def _short(raw: Any) -> str:
    """`repr(raw)`, cut to 60 characters: a message never repeats a huge input."""
    text = repr(raw)
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if raw in (0, 1) and isinstance(raw, int):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("", "true", "false"):
        return raw.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {_short(raw)}")


def _parse_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError(f"expected text, got {_short(raw)}")


def _parse_blocks(raw: Any) -> list[str]:
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected a list of block names, got {_short(raw)}")
    names = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    return sorted(names, key=lambda n: (BLOCKS_SD.index(n) if n in BLOCKS_SD else len(BLOCKS_SD), n))


def _parse_size(raw: Any) -> tuple[int, int]:
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) else [raw]
    if len(items) not in (1, 2):
        raise ValueError(f"expected N or height,width, got {_short(raw)}")
    sides = [_parse_int(item) for item in items]
    if len(sides) == 1:
        sides *= 2
    return min(sides), max(sides)


def _size_text(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]},{size[1]}"


def _parse_settings(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        return parse_settings_text(raw)
    if isinstance(raw, dict) and all(map(_is_key, raw)):
        return dict(raw)
    raise ValueError(f"expected key=value text, got {_short(raw)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Codec:
    """How one annotation's values are parsed from raw values, written back, and type-checked."""

    type: type
    parse: Callable[[Any], Any]
    raw: Callable[[Any], Any]
    accepts: Callable[[Any], bool]
    words: str  # what a value must be, for error messages


CODECS = {
    "int": Codec(int, _parse_int, _number_text, _is_int, "a whole number"),
    "float": Codec(
        float, _parse_float, _number_text, lambda v: _is_int(v) or isinstance(v, float), "a number"
    ),
    "str": Codec(str, _parse_str, str, lambda v: isinstance(v, str), "text"),
    "bool": Codec(bool, _parse_bool, bool, lambda v: isinstance(v, bool), "true or false"),
    "list[str]": Codec(
        list,
        _parse_blocks,
        list,
        lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
        "a list of block names",
    ),
    "tuple[int, int]": Codec(
        tuple,
        _parse_size,
        _size_text,
        lambda v: isinstance(v, tuple) and len(v) == 2 and all(map(_is_int, v)),
        "two whole numbers (height, width)",
    ),
    "dict[str, Any]": Codec(
        dict,
        _parse_settings,
        settings_text,
        lambda v: isinstance(v, dict) and all(map(_is_key, v)),
        "key=value settings",
    ),
}


@dataclass(frozen=True)
class FieldSpec:
    """One setting as the UI and the JSON see it: label, widget, type, default, choices and where it is shown."""

    name: str  # TrainConfig attribute
    key: str  # JSON key
    label: str
    widget: str
    annotation: str  # the attribute's annotation, a key of CODECS
    default: Any
    choices: tuple = ()
    shown_in: tuple[str, ...] = ()  # MODE_CODES values and/or SECOND_PASS_CODE
    section: str = ""  # general, required, blocks, options, second pass, prompts, images
    column: int = 0  # 1-3 inside the required / options sections, else 0
    help: str = ""
    saved: bool = True  # False: read from a JSON but never written (the negative prompt)
    blank: bool = False  # the default is written as "" (a blank textbox), as the original did

    @property
    def type(self) -> type:
        """The Python type of the typed value."""
        return CODECS[self.annotation].type

    @property
    def per_pass(self) -> bool:
        """Whether the setting belongs to one training pass (and so to the "2nd pass" JSON object)."""
        return self.section not in ("general", "prompts", "images")

    def shown(self, mode: str, second_pass: bool = False) -> bool:
        """Whether the widget is visible in `mode` (in the 2nd-pass panel when `second_pass`)."""
        return (SECOND_PASS_CODE if second_pass else MODE_CODES.get(mode)) in self.shown_in

    def type_problem(self, value: Any) -> str:
        """Empty when `value` has this field's type, else a sentence saying what it must be."""
        codec = CODECS[self.annotation]
        return "" if codec.accepts(value) else f"'{self.label}' must be {codec.words}, not {value!r}."

    def parse(self, raw: Any) -> Any:
        """Raw UI / JSON value (or an already typed one) → typed value; None or a blank number → the default."""
        blank = raw is None or (isinstance(raw, str) and not raw.strip() and self.type in (int, float))
        if blank:
            return list(self.default) if isinstance(self.default, list) else self.default
        try:
            return CODECS[self.annotation].parse(raw)
        except (ValueError, TypeError, TrainTrainError) as error:
            raise TrainTrainError(f"'{self.label}': {str(error).rstrip('.')}.") from None

    def raw(self, value: Any) -> Any:
        """Typed value → the raw value the UI widget and the settings JSON hold."""
        if self.blank and value == self.default:
            return ""
        return CODECS[self.annotation].raw(value)
