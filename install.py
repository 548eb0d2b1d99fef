"""Install TrainTrain's dependencies.

Inside a WebUI host (run by it at start, `launch` importable): only what the host lacks, through its own pip runner,
in the versions pinned here. AUTOMATIC1111 as always (its old huggingface_hub may be raised for diffusers; never
torch, gradio or transformers). reForge, Forge main and Forge Neo: their installed core packages are held as pip
constraints so nothing replaces them; Forge main / Neo already ship diffusers and newer stacks, so there nothing is
pinned and torch, gradio, transformers, diffusers and pydantic are never installed or replaced. By hand
(`python install.py [--tests] [--forge-stack]`): torch 2.13.0 first, then the pinned stack.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
CLIP_VOCAB = "clip-anytorch==2.6.0"  # only for its BPE vocabulary file; installed without dependencies
LDM = "stable-diffusion-sdkit==2.1.5"  # tests only: the WebUI's LDM model code (package `ldm`), without dependencies

# What the trainer needs beside the WebUI's own packages (WebUI 1.10: transformers 4.30.2, huggingface_hub < 1).
WEBUI_PACKAGES = {
    "diffusers": "diffusers==0.31.0",
    "pandas": "pandas",
    "matplotlib": "matplotlib",
    "prodigyopt": "prodigyopt==1.1.2",
    "dadaptation": "dadaptation==3.2",
    "lion-pytorch": "lion-pytorch==0.2.5",
    "schedulefree": "schedulefree==1.4.1",
    "came-pytorch": "came-pytorch==0.1.3",
    "pytorch-optimizer": "pytorch-optimizer==4.1.0",
}


# Never replaced inside reForge / Forge: held at the installed versions while TrainTrain's packages install.
PROTECTED = ("torch", "torchvision", "gradio", "transformers", "diffusers", "pydantic", "numpy", "huggingface-hub")


def installed(distribution: str) -> bool:
    """Whether a distribution is installed."""
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is at least major.minor."""
    try:
        version = importlib.metadata.version("torch").split("+")[0].split(".")
    except importlib.metadata.PackageNotFoundError:
        return False
    return (int(version[0]), int(version[1])) >= (major, minor)


def host_kind(webui_root: Path) -> str:
    """'forge' (Forge main / Neo ship `backend/memory_management.py`), 'reforge' (ships `ldm_patched/`) or 'a1111'."""
    if (webui_root / "backend" / "memory_management.py").is_file():
        return "forge"
    if (webui_root / "ldm_patched").is_dir():
        return "reforge"
    return "a1111"


def host_requirements(kind: str) -> dict[str, str]:
    """distribution → requirement for this host: on Forge the host's own stack decides the versions (none pinned)."""
    if kind != "forge":
        return WEBUI_PACKAGES
    return {name: name for name in WEBUI_PACKAGES}


def constraints_text() -> str:
    """pip constraints holding the installed versions of the host's core packages."""
    pins = []
    for distribution in PROTECTED:
        try:
            pins.append(f"{distribution}=={importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(pins) + "\n"


def clip_vocabulary_present() -> bool:
    """Whether the CLIP BPE vocabulary file is installed (clip-anytorch, or open_clip / clip as the host ships them)."""
    return installed("clip-anytorch") or any(importlib.util.find_spec(name) for name in ("open_clip", "clip"))


def install_in_webui() -> None:
    """Inside a host: add only what is missing through the host's own pip runner (Forge family: core packages held)."""
    import launch  # the host's module, importable only when the host runs this file

    kind = host_kind(Path(launch.__file__).resolve().parent)
    missing = [r for d, r in host_requirements(kind).items() if not installed(d)]
    if not installed("bitsandbytes") and torch_at_least(2, 4):  # 8-bit optimizers need torch >= 2.4
        missing.append("bitsandbytes" if kind == "forge" else "bitsandbytes==0.50.2")
    if not clip_vocabulary_present():  # Forge Neo ships neither open_clip nor clip: only the vocabulary file is used
        missing.append(f"--no-deps {CLIP_VOCAB}")
    if not missing:
        return
    if kind == "a1111":
        for requirement in missing:
            launch.run_pip(f"install {requirement}", f"TrainTrain requirement: {requirement}")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="traintrain-constraints-", delete=False) as handle:
        handle.write(constraints_text())
    try:
        for requirement in missing:
            quoted = requirement if requirement.startswith("--") else f'"{requirement}"'
            launch.run_pip(f'install {quoted} -c "{handle.name}"', f"TrainTrain requirement: {requirement}")
    finally:
        os.unlink(handle.name)


def pip(*args: str) -> None:
    """Run pip with this interpreter; stop on failure."""
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])


def install_standalone(with_tests: bool, forge_stack: bool = False) -> None:
    """By hand or in CI: torch first (so nothing pulls another build), then the pinned stack.

    `forge_stack`: the Forge / Forge Neo versions (requirements-forge.txt: gradio 4, numpy 2, ...) instead of the
    WebUI 1.10 ones (requirements.txt); use a separate virtual environment for it.
    """
    if not installed("torch"):
        pip(TORCH)
    pip("-r", str(ROOT / ("requirements-forge.txt" if forge_stack else "requirements.txt")))
    if not clip_vocabulary_present():
        pip("--no-deps", CLIP_VOCAB)
    if with_tests:
        pip("-r", str(ROOT / "requirements-test.txt"))
        if not installed("stable-diffusion-sdkit"):
            pip("--no-deps", LDM)


def main() -> None:
    """Pick the WebUI or the standalone installer."""
    if importlib.util.find_spec("launch") is not None and "--standalone" not in sys.argv:
        install_in_webui()
    else:
        install_standalone("--tests" in sys.argv, forge_stack="--forge-stack" in sys.argv)


if __name__ == "__main__":
    main()
