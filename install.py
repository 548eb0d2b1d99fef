"""Install TrainTrain's dependencies.

Inside the WebUI (run by it at start, `launch` importable): only what the WebUI lacks, in versions that fit its pins;
never torch, gradio or transformers. By hand (`python install.py [--tests]`): torch 2.13.0 first, then the pinned stack.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
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


def install_in_webui() -> None:
    """Inside the WebUI: add only what is missing through the WebUI's own pip runner."""
    import launch  # the WebUI's module, importable only when the WebUI runs this file

    for distribution, requirement in WEBUI_PACKAGES.items():
        if not installed(distribution):
            launch.run_pip(f"install {requirement}", f"TrainTrain requirement: {requirement}")
    if not installed("bitsandbytes") and torch_at_least(2, 4):  # 8-bit optimizers need torch >= 2.4
        launch.run_pip("install bitsandbytes==0.50.2", "TrainTrain requirement: bitsandbytes")


def pip(*args: str) -> None:
    """Run pip with this interpreter; stop on failure."""
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])


def install_standalone(with_tests: bool) -> None:
    """By hand or in CI: torch first (so nothing pulls another build), then the pinned stack."""
    if not installed("torch"):
        pip(TORCH)
    pip("-r", str(ROOT / "requirements.txt"))
    if not installed("clip-anytorch") and importlib.util.find_spec("open_clip") is None:
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
        install_standalone("--tests" in sys.argv)


if __name__ == "__main__":
    main()
