"""The open-folder button: the right opener per OS, hidden without a desktop, and a clear message on failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

import traintrain.ui.open_folder as of
from traintrain.errors import TrainTrainError


@pytest.fixture
def launched(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, **_: calls.append(command))
    return calls


@pytest.mark.parametrize(
    "platform, env, which, expected",
    [
        ("linux", {"DISPLAY": ":0"}, "/usr/bin/xdg-open", ["/usr/bin/xdg-open"]),
        ("linux", {"WAYLAND_DISPLAY": "wayland-0"}, "/usr/bin/xdg-open", ["/usr/bin/xdg-open"]),
        ("linux", {}, "/usr/bin/xdg-open", None),  # a headless server
        ("linux", {"DISPLAY": ":0"}, None, None),  # no file manager launcher
        ("darwin", {}, None, ["open"]),
        ("darwin", {"SSH_CONNECTION": "1.2.3.4 5 6.7.8.9 22"}, None, None),
        ("win32", {}, None, []),
    ],
)  # fmt: skip
def test_opener_per_os(monkeypatch, platform, env, which, expected) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SSH_CONNECTION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(of.shutil, "which", lambda _name: which)
    assert of.opener() == expected
    assert of.desktop_available() is (expected is not None)


def test_open_folder_launches_the_opener(monkeypatch, launched, tmp_path) -> None:
    monkeypatch.setattr(of, "opener", lambda: ["xdg-open"])
    assert of.open_folder(tmp_path / "jsons") == f"Opened {tmp_path / 'jsons'}."
    assert launched == [["xdg-open", str(tmp_path / "jsons")]] and (tmp_path / "jsons").is_dir()


def test_headless_refuses_with_the_path(monkeypatch, launched, tmp_path) -> None:
    monkeypatch.setattr(of, "opener", lambda: None)
    with pytest.raises(TrainTrainError, match="no desktop"):
        of.open_folder(tmp_path)
    assert launched == []


def test_button_hidden_on_this_headless_machine(monkeypatch, tmp_path) -> None:
    from traintrain.jobs import JobQueue, OpenModelProvider
    from traintrain.modes import OutputDirs
    from traintrain.ui import TrainTrainUI

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    queue = JobQueue(OpenModelProvider("tiny"), OutputDirs(tmp_path / "l", tmp_path / "g", tmp_path / "j"), tmp_path / "q")
    try:
        ui = TrainTrainUI(queue, tmp_path / "presets")
        assert ui.presets.open_button.visible is False
    finally:
        queue.close(timeout=60)
