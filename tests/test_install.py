"""install.py inside each host, with a fake `launch` module (the host's pip runner) in a fake host folder: only what
the host lacks is installed; AUTOMATIC1111 as always, reForge / Forge with the host's core packages held."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def install() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("traintrain_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_folder(root: Path, kind: str) -> Path:
    """The files that tell the hosts apart: Forge's `backend/memory_management.py`, reForge's `ldm_patched/`."""
    (root / "modules").mkdir(parents=True)
    if kind == "forge":
        (root / "backend").mkdir()
        (root / "backend" / "memory_management.py").write_text("")
        (root / "modules_forge").mkdir()
    if kind == "reforge":
        (root / "ldm_patched" / "modules").mkdir(parents=True)
        (root / "modules_forge").mkdir()
    return root


def run_in_host(
    install, monkeypatch, root: Path, present: set[str], torch_version: str = "2.11.0+cu130"
) -> list[tuple]:
    """Run the host part of install.py; returns the pip commands with the constraints file's text when one was given."""
    runs: list[tuple] = []

    def run_pip(command: str, desc: str) -> None:
        constraints = command.split(' -c "')[1].rstrip('"') if " -c " in command else None
        runs.append((command.split(" -c ")[0], Path(constraints).read_text() if constraints else None))

    launch = types.ModuleType("launch")
    launch.__file__ = str(root / "launch.py")
    launch.run_pip = run_pip
    launch.git_clone = lambda *args: pytest.fail("no launch.git_clone: Forge Neo refuses it")
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(install, "installed", lambda distribution: distribution in present)
    versions = {"torch": torch_version, "gradio": "4.40.0", "transformers": "4.56.2", "numpy": "2.3.5"}

    def version(distribution: str) -> str:
        if distribution not in versions:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return versions[distribution]

    monkeypatch.setattr(install.importlib.metadata, "version", version)
    temp = root / "tmp"
    temp.mkdir()
    monkeypatch.setattr(install.tempfile, "tempdir", str(temp))
    install.install_in_webui()
    assert list(temp.iterdir()) == [], "the constraints file is removed"
    return runs


@pytest.mark.parametrize("kind", ["a1111", "reforge", "forge"])
def test_the_host_is_told_by_its_files(install, tmp_path, kind) -> None:
    assert install.host_kind(host_folder(tmp_path, kind)) == kind


def test_forge_gets_only_what_it_lacks_unpinned_with_its_core_held(install, monkeypatch, tmp_path) -> None:
    present = {"torch", "diffusers", "transformers", "gradio", "pydantic", "pandas", "matplotlib", "bitsandbytes"}
    runs = run_in_host(install, monkeypatch, host_folder(tmp_path, "forge"), present)
    held = "torch==2.11.0+cu130\ngradio==4.40.0\ntransformers==4.56.2\nnumpy==2.3.5\n"
    expected = ["prodigyopt", "dadaptation", "lion-pytorch", "schedulefree", "came-pytorch", "pytorch-optimizer"]
    assert runs == [(f'install "{name}"', held) for name in expected]


def test_forge_pins_nothing_and_never_installs_its_core(install, monkeypatch, tmp_path) -> None:
    runs = run_in_host(install, monkeypatch, host_folder(tmp_path, "forge"), set(), torch_version="2.3.1")
    commands = [command for command, _ in runs]
    assert 'install "diffusers"' in commands and 'install "bitsandbytes"' not in commands  # torch 2.3 < 2.4
    names = {command.split('"')[1] for command in commands}
    assert not names & {"torch", "gradio", "transformers", "pydantic"} and not any("==" in name for name in names)


def test_reforge_gets_the_pinned_versions_with_its_core_held(install, monkeypatch, tmp_path) -> None:
    present = set(install.WEBUI_PACKAGES) - {"prodigyopt"}
    runs = run_in_host(install, monkeypatch, host_folder(tmp_path, "reforge"), present)
    assert [command for command, _ in runs] == ['install "prodigyopt==1.1.2"', 'install "bitsandbytes==0.50.2"']
    assert all(held.startswith("torch==2.11.0+cu130\n") for _, held in runs)


def test_automatic1111_installs_as_before(install, monkeypatch, tmp_path) -> None:
    present = set(install.WEBUI_PACKAGES) - {"diffusers"} | {"bitsandbytes"}
    runs = run_in_host(install, monkeypatch, host_folder(tmp_path, "a1111"), present, torch_version="2.1.2+cu121")
    assert runs == [("install diffusers==0.31.0", None)]


def test_nothing_runs_when_nothing_is_missing(install, monkeypatch, tmp_path) -> None:
    present = set(install.WEBUI_PACKAGES) | {"bitsandbytes"}
    assert run_in_host(install, monkeypatch, host_folder(tmp_path, "forge"), present) == []


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_the_clip_vocabulary_is_added_where_the_host_lacks_it(install, monkeypatch, tmp_path, kind) -> None:
    monkeypatch.setattr(install, "clip_vocabulary_present", lambda: False)  # Forge Neo: neither open_clip nor clip
    present = set(install.WEBUI_PACKAGES) | {"bitsandbytes"}
    runs = run_in_host(install, monkeypatch, host_folder(tmp_path, kind), present)
    assert [command for command, _ in runs] == [f"install --no-deps {install.CLIP_VOCAB}"]
