"""Server-side checks of UI handler inputs: what a browser (or a direct HTTP call) sends is read and bounded here, so
a bad value is a message, never a traceback. The widgets' own limits are only a convenience of the page."""

from __future__ import annotations

import math
from typing import Any

from traintrain.errors import TrainTrainError

MAX_TEXT = 4096  # characters of a name or path typed into a box


def text(value: Any, label: str, *, limit: int = MAX_TEXT) -> str:
    """A text box's value: a string (None is ""), at most `limit` characters, no NUL."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TrainTrainError(f"'{label}' must be text, not {type(value).__name__}.")
    if len(value) > limit or "\x00" in value:
        raise TrainTrainError(f"'{label}' must be at most {limit} characters of text without NUL.")
    return value


def number(value: Any, label: str, low: float, high: float, *, whole: bool = False) -> float:
    """A slider's or number box's value in [low, high] (a whole number when `whole`); numeric text is accepted."""
    try:
        parsed = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        parsed = math.nan
    if isinstance(value, bool) or not math.isfinite(parsed) or not low <= parsed <= high or (whole and parsed % 1):
        kind = "a whole number" if whole else "a number"
        raise TrainTrainError(f"'{label}' must be {kind} from {low:g} to {high:g}, not {str(value)[:40]!r}.")
    return int(parsed) if whole else parsed


def flag(value: Any, label: str) -> bool:
    """A checkbox's value: True or False (None counts as False)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise TrainTrainError(f"'{label}' must be true or false, not {str(value)[:40]!r}.")


def choice(value: Any, label: str, choices: tuple[str, ...]) -> str:
    """A radio's value: one of `choices`."""
    if value not in choices:
        raise TrainTrainError(f"'{label}' must be one of {', '.join(choices)}, not {str(value)[:40]!r}.")
    return value
