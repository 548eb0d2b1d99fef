"""Wiring helpers: user errors become the message output instead of a gradio error popup."""

from __future__ import annotations

import functools
from typing import Any, Callable

import gradio as gr

from traintrain.errors import TrainTrainError


def shows_errors(fn: Callable[..., Any], other_outputs: int = 0) -> Callable[..., Any]:
    """Wrap a handler whose last output is a message: a TrainTrainError leaves the other outputs alone and is shown."""

    @functools.wraps(fn)
    def handler(*args: Any) -> Any:
        try:
            return fn(*args)
        except TrainTrainError as error:
            message = f"Error: {error}"
            return (*[gr.update()] * other_outputs, message) if other_outputs else message

    return handler
