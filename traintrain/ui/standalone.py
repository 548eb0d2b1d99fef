"""`python -m traintrain ui`: the TrainTrain UI on its own gradio server, training with `open_model` (default: tiny)."""

from __future__ import annotations

import ipaddress
import signal
import sys
from functools import partial
from pathlib import Path

import gradio as gr

from traintrain.errors import TrainTrainError
from traintrain.jobs import OpenModelProvider
from traintrain.models.open import TINY_MODELS
from traintrain.modes import OutputDirs
from traintrain.ui import compat
from traintrain.ui.app import create_ui

ROOT = Path(__file__).resolve().parents[2]


def page_assets() -> tuple[str, str]:
    """The extension's `style.css` and every `javascript/*.js` (as the WebUI loads them) as (css, head HTML)."""
    css = (ROOT / "style.css").read_text(encoding="utf-8")
    scripts = sorted((ROOT / "javascript").glob("*.js"))
    return css, "".join(f"<script>{path.read_text(encoding='utf-8')}</script>" for path in scripts)


def parse_auth(text: str) -> tuple[str, str]:
    """`user:password` → (user, password); both must be non-empty."""
    user, sep, password = text.partition(":")
    if not (sep and user.strip() and password):
        raise TrainTrainError("--auth takes user:password, e.g. --auth anna:s3cret.")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    """Whether `host` serves this machine only (localhost, 127.x, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse to serve other machines without a login: the UI reads and writes files on this computer."""
    if auth is None and not is_loopback(host):
        raise TrainTrainError(
            f"--host {host} lets other machines use this UI, which reads and writes files here: "
            "add --auth user:password, or leave --host out to serve this machine only."
        )


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    model: str = "tiny",
    *,
    auth: tuple[str, str] | None = None,
    root: Path | None = None,
    block: bool = True,
) -> gr.Blocks:
    """Serve the UI; files go under `root` (default: the project folder): output/, logs/, jsons/, presets/, queue.json.

    An empty Model box trains `model`; `auth` (user, password) asks for a login, and is required for a host other than
    this machine. With `block=False` it returns the running Blocks (close it with `.close()`).
    """
    check_exposure(host, auth)
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
    if block:  # Ctrl-C and SIGTERM: the server closes at once (open pages or not), then …
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, partial(_shut_down, ui.blocks))
    ui.blocks.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, auth=auth, **compat.launch_options(css, head)
    )
    if block:
        print("Stopping: a running training saves what it has learned (as its 'save on stop' says)…", file=sys.stderr)
        ui.queue.close()  # … the running job stops after its step and saves; the queue file keeps the rest
    return ui.blocks


def _shut_down(blocks: gr.Blocks, _signum: int, _frame: object) -> None:
    """End gradio's wait in the main thread; its server stops without waiting for open pages' connections."""
    server = getattr(blocks, "server", None)
    if server is not None:
        server.force_exit = True
    raise KeyboardInterrupt
