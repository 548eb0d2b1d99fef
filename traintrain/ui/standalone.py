"""`python -m traintrain ui`: the TrainTrain UI on its own gradio server, training with `open_model` (default: tiny)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from traintrain.jobs import OpenModelProvider
from traintrain.models.open import TINY_MODELS
from traintrain.modes import OutputDirs
from traintrain.ui import compat
from traintrain.ui.app import create_ui

ROOT = Path(__file__).resolve().parents[2]


def page_assets() -> tuple[str, str]:
    """The extension's `style.css` and `javascript/traintrain.js` as (css, head HTML) for a standalone page."""
    css = (ROOT / "style.css").read_text(encoding="utf-8")
    script = (ROOT / "javascript" / "traintrain.js").read_text(encoding="utf-8")
    return css, f"<script>{script}</script>"


def launch(
    host: str = "127.0.0.1", port: int = 7860, model: str = "tiny", *, root: Path | None = None, block: bool = True
) -> gr.Blocks:
    """Serve the UI; files go under `root` (default: the project folder): output/, logs/, jsons/, presets/, queue.json.

    An empty Model box trains `model`. With `block=False` it returns the running Blocks (close it with `.close()`).
    """
    root = Path(root) if root else ROOT
    dirs = OutputDirs(lora=root / "output", logs=root / "logs", jsons=root / "jsons")
    css, head = page_assets()
    models = list(dict.fromkeys(["", model, *TINY_MODELS]))
    ui = create_ui(
        OpenModelProvider(model), dirs, root / "presets", root / "queue.json",
        model_choices=lambda: models, vae_choices=lambda: [""], css=css,
    )  # fmt: skip
    compat.add_head(ui.blocks, head)
    compat.enable_queue(ui.blocks)
    ui.blocks.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, **compat.launch_options(css, head)
    )
    return ui.blocks
