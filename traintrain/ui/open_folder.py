"""The "open folder" button: shows a folder in the file manager of the machine TrainTrain runs on (Windows, macOS,
Linux desktops); on a server without a desktop there is nothing to open it in, so the button is hidden there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from traintrain.errors import TrainTrainError


def opener() -> list[str] | None:
    """The command that opens a folder here ([] on Windows: os.startfile), None without a desktop."""
    if sys.platform == "win32":
        return []
    if sys.platform == "darwin":
        return ["open"] if not os.environ.get("SSH_CONNECTION") else None
    desktop = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    tool = shutil.which("xdg-open")
    return [tool] if desktop and tool else None


def desktop_available() -> bool:
    """Whether a folder can be shown to someone sitting at this machine (the button is visible only then)."""
    return opener() is not None


def open_folder(folder: Path) -> str:
    """Open `folder` (created if missing) in the file manager; the message to show."""
    command = opener()
    if command is None:
        raise TrainTrainError("This machine has no desktop to open a folder on: its files are in " + str(folder))
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if command:
            subprocess.Popen([*command, str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            os.startfile(str(folder))  # type: ignore[attr-defined]  # Windows only
    except OSError as error:
        raise TrainTrainError(f"Could not open {folder}: {error.strerror or error}.") from error
    return f"Opened {folder}."
