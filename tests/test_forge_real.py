"""The extension inside a real Forge (main) or Forge Neo (issue 12): installed from a git URL, trained through the
TrainTrain tab's own gradio 4 events, and the LoRA used by txt2img with `<lora:NAME:1>`, all over HTTP, on the CPU.

Skipped unless FORGE_DIR names a Forge main or Forge Neo checkout (nothing is downloaded: `repositories/` in place for
Forge main, the Python packages installed). FORGE_PYTHON is its interpreter (default: FORGE_DIR/venv/bin/python), with
the extension's requirements installed (its install.py, run the WebUI's way). TRAINTRAIN_GIT_URL is the git URL
installed (default: this checkout, as file://). The Forge checkout is never written to: models, extensions and settings
live in a temporary --data-dir. How it was run, and the result: docs/forge-check.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.forge

FORGE_DIR = os.environ.get("FORGE_DIR")
if not FORGE_DIR:
    pytest.skip("FORGE_DIR is not set (a real Forge or Forge Neo checkout)", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from real_host import GradioApp, HostServer, free_port  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from traintrain.config import FIELD_BY_NAME  # noqa: E402
from traintrain.config_fields import IMAGE  # noqa: E402
from traintrain.demo import demo_config, write_sample_images  # noqa: E402
from traintrain.models.checkpoint import shipped_config_dir  # noqa: E402
from traintrain.models.ldm_convert import save_single_file  # noqa: E402
from traintrain.models.tiny import build_tiny_components, like_a_trained_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_NAME = "forge_check"
CKPT = "random-sd15"
START_TIMEOUT = 1200  # seconds: importing Forge on 2 shared cores is slow
TRAIN_TIMEOUT = 1800
ITERATIONS = 10  # a full-size SD1.5 UNet step takes seconds on the CPU
STEPS = 2  # txt2img sampling steps
NEO_VERSION_UID = "PY313"  # Neo's launch_utils.VERSION_UID: without it in config.json, Neo waits on input()


def write_sd15_shaped_checkpoint(folder: Path) -> Path:
    """A random checkpoint with SD1.5's exact tensor names and shapes (fp16): Forge recognises a model only by its
    shapes (huggingface_guess wants SD1.5's 320 channels and 768-wide context) and builds the text encoder and the VAE
    from its bundled SD1.5 configs, so the project's tiny model is not recognised."""
    config = shipped_config_dir("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config(json.loads((config / "unet" / "config.json").read_text()))
        vae = like_a_trained_vae(AutoencoderKL.from_config(json.loads((config / "vae" / "config.json").read_text())))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder"))
    modules = {"unet": unet.half().eval(), "vae": vae.half().eval(), "text_encoders": [text_encoder.half().eval()]}
    components = dataclasses.replace(build_tiny_components("sd1"), **modules)
    folder.mkdir(parents=True, exist_ok=True)
    return save_single_file(components, folder / f"{CKPT}.safetensors")


def is_neo(forge_dir: Path) -> bool:
    version = forge_dir / "modules_forge" / "forge_version.py"
    return version.is_file() and re.search(r"""version\s*=\s*["']neo["']""", version.read_text()) is not None


def launch_command(forge_dir: Path, python: str, data: Path, checkpoint: Path, port: int) -> list[str]:
    """launch.py offline on the CPU in fp32: Forge main's flags, or Neo's (forge.md §6)."""
    common = ["--skip-prepare-environment", "--skip-version-check", "--data-dir", str(data), "--no-hashing", "--api"]
    common += ["--port", str(port), "--loglevel", "INFO"]
    if is_neo(forge_dir):
        host = ["--skip-python-version-check", "--cpu", "--fp32-text-enc", "--force-fp32"]
    else:
        host = ["--skip-torch-cuda-test", "--ckpt", str(checkpoint), "--no-download-sd-model", "--always-cpu"]
        host += ["--all-in-fp32"]
    return [python, "launch.py", *common, *host]


def setting_values(app: GradioApp, inputs: list[int], config) -> list:
    """The Start button's inputs (widgets `tt_<field>` / `tt_2nd_<field>`) showing `config`, as the panel shows it."""
    values = []
    for component_id in inputs:
        name = re.sub(r"^tt_(2nd_)?", "", app.elem_id(component_id))
        spec = FIELD_BY_NAME[name]
        values.append(None if spec.widget == IMAGE else spec.raw(getattr(config, name)))
    return values


def lora_log_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "[LORA]" in line]


@pytest.fixture(scope="module")
def forge(tmp_path_factory) -> HostServer:
    forge_dir = Path(FORGE_DIR).resolve()
    python = os.environ.get("FORGE_PYTHON") or str(forge_dir / "venv" / "bin" / "python")
    data = tmp_path_factory.mktemp("forge-data")
    checkpoint = write_sd15_shaped_checkpoint(data / "models" / "Stable-diffusion")
    settings = {"VERSION_UID": NEO_VERSION_UID, "sd_model_checkpoint": checkpoint.name}
    (data / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    url = os.environ.get("TRAINTRAIN_GIT_URL") or ROOT.as_uri()
    subprocess.run(["git", "clone", "--quiet", url, str(data / "extensions" / "traintrain")], check=True)
    port, log = free_port(), data / "forge.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["COLUMNS"] = "1000"  # Neo logs through rich, which wraps each message at the terminal width (80 in a pipe)
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            launch_command(forge_dir, python, data, checkpoint, port),
            cwd=forge_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = HostServer(port, process, log)
    try:
        server.wait_until(
            lambda s: any(m["model_name"] == CKPT for m in s.request("/sdapi/v1/sd-models", timeout=10)),
            START_TIMEOUT,
            f"{CKPT} listed by /sdapi/v1/sd-models",
        )
        server.request("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint.name})
        yield server
    finally:
        server.stop()


def train_in_the_tab(forge: HostServer, images: Path) -> str:
    """Fill the TrainTrain tab with the LoRA demo settings, press Start Training and poll its status until idle with
    the job's outcome (which names the LoRA, saved or not)."""
    app = GradioApp(forge)
    assert app.gradio4, "Forge main and Neo run gradio 4"
    assert app.has("tt_start"), "the TrainTrain tab is not on the page"
    start = app.event("tt_start")
    status = app.event("tt_status_refresh")
    config = demo_config(images, iterations=ITERATIONS)
    config = dataclasses.replace(config, save_lora_name=LORA_NAME)
    message = app.call(start, setting_values(app, start[2], config))[0]
    assert str(message).startswith("Started"), message

    deadline, html = time.monotonic() + TRAIN_TIMEOUT, ""
    while time.monotonic() < deadline:
        html = app.call(status, [])[0]
        if 'data-state="idle"' in html and LORA_NAME in html:  # idle with the job's outcome, not before it ran
            break
        time.sleep(5)
    assert 'data-state="idle"' in html, f"training did not finish in {TRAIN_TIMEOUT} s: {html}"
    outcome = re.sub(r"<[^>]+>", " ", html).split("Idle.")[-1].strip()
    assert f"{LORA_NAME}.safetensors" in outcome, f"the training did not save its LoRA: {outcome}"
    return outcome


def test_lora_trained_in_the_tab_changes_txt2img(forge: HostServer, tmp_path) -> None:
    prompt = "demo style, a picture"
    base = forge.txt2img(prompt, STEPS)
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, forge.txt2img(prompt, STEPS)), "txt2img is not deterministic for a fixed seed"

    print("TrainTrain status:", train_in_the_tab(forge, write_sample_images(tmp_path / "images")))

    forge.request("/sdapi/v1/refresh-loras", {})
    loras = {lora["name"]: lora for lora in forge.request("/sdapi/v1/loras")}
    assert LORA_NAME in loras, f"{LORA_NAME} not listed: {sorted(loras)}"
    assert Path(loras[LORA_NAME]["path"]).is_file()
    assert loras[LORA_NAME]["metadata"].get("ss_base_model_version") == "sd_v1"

    after = forge.txt2img(prompt, STEPS)
    assert np.array_equal(base, after), "Forge's model changed by the training (base image differs)"
    with_lora = forge.txt2img(f"{prompt} <lora:{LORA_NAME}:1>", STEPS)
    difference = float(np.abs(with_lora.astype(np.float64) - base.astype(np.float64)).mean())
    print(f"mean abs pixel difference with <lora:{LORA_NAME}:1>: {difference:.3f} (0-255 scale)")
    assert difference > 1.0, f"the LoRA barely changed the image ({difference:.3f})"
    assert np.array_equal(base, forge.txt2img(prompt, STEPS)), "the base image changed after a LoRA generation"

    log = forge.log_text()
    assert not re.search(r"(Missing|Unexpected): \[", log), "Forge built the checkpoint with missing / extra tensors"
    lines = lora_log_lines(log)
    print("\n".join(lines))
    loaded = [re.search(r"for \S+-(UNet|CLIP) with (\d+) keys .*\(skipped (\d+) keys\)", line) for line in lines]
    parts = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in loaded if m}
    assert set(parts) == {"UNet", "CLIP"}, f"the LoRA was not applied to both UNet and text encoder: {lines}"
    assert all(skipped == 0 for _, skipped in parts.values()), lines
    assert not [line for line in lines if "unmatched" in line or "ismatch" in line], lines
