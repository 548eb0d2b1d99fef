"""The extension inside a real AUTOMATIC1111 WebUI (issue 8): installed from a git URL, trained through the TrainTrain
tab's own gradio endpoint, and the LoRA used by txt2img with `<lora:NAME:1>`, all over HTTP, on the CPU.

Skipped unless WEBUI_DIR names a WebUI checkout (v1.10.1 with its `repositories/` in place; nothing is downloaded).
WEBUI_PYTHON is the WebUI's interpreter (default: WEBUI_DIR/venv/bin/python), with the extension's requirements
installed (its install.py, run the WebUI's way). TRAINTRAIN_GIT_URL is the git URL installed (default: this
checkout, as file://). The WebUI checkout is never written to: models, extensions and settings live in a temporary
--data-dir. How it was run, and the result: docs/webui-check.md.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.webui

WEBUI_DIR = os.environ.get("WEBUI_DIR")
if not WEBUI_DIR:
    pytest.skip("WEBUI_DIR is not set (a real AUTOMATIC1111 WebUI checkout)", allow_module_level=True)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from traintrain.config import FIELD_BY_NAME  # noqa: E402
from traintrain.config_fields import IMAGE  # noqa: E402
from traintrain.demo import demo_config, write_sample_images  # noqa: E402
from webui_real_setup import (  # noqa: E402
    OTHER_TRAINER_ROUTE,
    SD1,
    SDXL,
    write_checkpoints,
    write_other_trainer_extension,
)

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 900  # seconds: importing the WebUI on 2 shared cores is slow
TRAIN_TIMEOUT = 600
ITERATIONS = 30
LORA_NAME = {SD1: "webui_check", SDXL: "webui_check_sdxl"}
BASE_MODEL_VERSION = {SD1: "sd_v1", SDXL: "sdxl_base_v1-0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WebUI:
    """HTTP access to the started server."""

    def __init__(self, port: int, process: subprocess.Popen, log: Path) -> None:
        self.base, self.process, self.log = f"http://127.0.0.1:{port}", process, log

    def request(self, path: str, payload: Any = None, timeout: float = 600) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def wait_ready(self) -> None:
        """Wait for the startup line, then for both checkpoints in the model list. No request goes out before the
        startup line: one that reaches the server while the WebUI still adds its API middleware kills the WebUI
        ("Cannot add middleware after an application has started")."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"The WebUI exited ({self.process.returncode}):\n{self.log_tail()}")
            if "Startup time:" not in self.log.read_text(encoding="utf-8", errors="replace"):
                time.sleep(3)
                continue
            try:
                models = self.request("/sdapi/v1/sd-models", timeout=10)
                if {SD1, SDXL} <= {m["model_name"] for m in models}:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(3)
        pytest.fail(f"The WebUI did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def use_checkpoint(self, name: str) -> None:
        """Load checkpoint `name`, as picking it in the page's checkpoint list does."""
        self.request("/sdapi/v1/options", {"sd_model_checkpoint": name})
        loaded = self.request("/sdapi/v1/options")["sd_model_checkpoint"]
        assert Path(loaded.split(" [")[0]).stem == name, f"{name} was not loaded: {loaded}"

    def txt2img(self, prompt: str) -> np.ndarray:
        payload = {
            "prompt": prompt,
            "negative_prompt": "",
            "seed": 1234,
            "steps": 4,
            "width": 64,
            "height": 64,
            "cfg_scale": 5,
            "sampler_name": "Euler",
            "batch_size": 1,
            "n_iter": 1,
            "save_images": False,
        }
        image = self.request("/sdapi/v1/txt2img", payload)["images"][0]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[-1]))).convert("RGB"))


class GradioApp:
    """The page's gradio app (3.41): components by elem_id and events called by fn_index, as the browser does."""

    def __init__(self, webui: WebUI) -> None:
        self.webui = webui
        config = webui.request("/config")
        self.components = {c["id"]: c for c in config["components"]}
        self.dependencies = config["dependencies"]

    def elem_id(self, component_id: int) -> str:
        return self.components.get(component_id, {}).get("props", {}).get("elem_id") or ""

    def event(self, elem_id: str, trigger: str = "click") -> tuple[int, list[int]]:
        """fn_index and input component ids of the `trigger` event of the component `elem_id`."""
        for index, dependency in enumerate(self.dependencies):
            pairs = [
                t if isinstance(t, list) else [t, dependency.get("trigger")] for t in dependency.get("targets", [])
            ]
            targets, triggers = [t[0] for t in pairs], [t[1] for t in pairs]  # gradio 3: ids + "trigger"; 4: pairs
            if any(self.elem_id(t) == elem_id for t in targets) and trigger in triggers:
                return index, list(dependency["inputs"])
        raise AssertionError(f"No {trigger} event on #{elem_id} in the page")

    def call(self, fn_index: int, data: list[Any]) -> list[Any]:
        return self.webui.request("/run/predict", {"fn_index": fn_index, "data": data, "session_hash": "ttcheck"})[
            "data"
        ]


def setting_values(app: GradioApp, inputs: list[int], config) -> list[Any]:
    """The Start button's inputs (widgets `tt_<field>` / `tt_2nd_<field>`) showing `config`, as the panel shows it."""
    values = []
    for component_id in inputs:
        name = re.sub(r"^tt_(2nd_)?", "", app.elem_id(component_id))
        spec = FIELD_BY_NAME[name]
        values.append(None if spec.widget == IMAGE else spec.raw(getattr(config, name)))
    return values


@pytest.fixture(scope="module")
def webui(tmp_path_factory) -> WebUI:
    webui_dir = Path(WEBUI_DIR).resolve()
    python = os.environ.get("WEBUI_PYTHON") or str(webui_dir / "venv" / "bin" / "python")
    data = tmp_path_factory.mktemp("webui-data")
    checkpoints = write_checkpoints(data, webui_dir)
    url = os.environ.get("TRAINTRAIN_GIT_URL") or ROOT.as_uri()
    subprocess.run(["git", "clone", "--quiet", url, str(data / "extensions" / "traintrain")], check=True)
    write_other_trainer_extension(data / "extensions" / "other-trainer")
    # No live previews: for SDXL the WebUI would download its preview approximation model.
    (data / "config.json").write_text(json.dumps({"live_previews_enable": False}), encoding="utf-8")
    port, log = free_port(), data / "webui.log"
    command = [
        python,
        "launch.py",
        "--skip-prepare-environment",
        "--skip-version-check",
        "--data-dir",
        str(data),
        "--ckpt",
        str(checkpoints[SD1]),
        "--no-download-sd-model",
        "--use-cpu",
        "all",
        "--no-half",
        "--precision",
        "full",
        "--no-hashing",
        "--api",
        "--port",
        str(port),
        "--loglevel",
        "DEBUG",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=webui_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = WebUI(port, process, log)
    try:
        server.wait_ready()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def train_in_tab(webui: WebUI, images: Path, lora_name: str) -> str:
    """Fill the tab with the demo's LoRA settings, press Start Training and poll the status until the queue is
    done; the status HTML."""
    app = GradioApp(webui)
    start, inputs = app.event("tt_start")
    status, _ = app.event("tt_status_refresh")
    config = demo_config(write_sample_images(images), iterations=ITERATIONS)
    config = dataclasses.replace(config, save_lora_name=lora_name)
    message = app.call(start, setting_values(app, inputs, config))[0]
    assert message.startswith("Started"), message

    deadline, html = time.monotonic() + TRAIN_TIMEOUT, ""
    while time.monotonic() < deadline:
        html = app.call(status, [])[0]
        if 'data-state="idle"' in html and "job(s) queued" not in html:  # a started job waits a moment as queued
            break
        time.sleep(2)
    assert 'data-state="idle"' in html, f"training did not finish in {TRAIN_TIMEOUT} s: {html}"
    assert "Error" not in html and "failed" not in html.lower(), html
    print("TrainTrain status:", re.sub(r"<[^>]+>", " ", html).split("Idle.")[-1].strip())
    return html


@pytest.mark.parametrize("checkpoint", [SD1, SDXL])
def test_lora_trained_in_the_tab_changes_txt2img(webui: WebUI, tmp_path, checkpoint: str) -> None:
    webui.use_checkpoint(checkpoint)
    prompt, lora_name = "demo style, a picture", LORA_NAME[checkpoint]
    base = webui.txt2img(prompt)
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, webui.txt2img(prompt)), "txt2img is not deterministic for a fixed seed"

    html = train_in_tab(webui, tmp_path / "images", lora_name)

    webui.request("/sdapi/v1/refresh-loras", {})
    loras = {lora["name"]: lora for lora in webui.request("/sdapi/v1/loras")}
    assert lora_name in loras, f"{lora_name} not listed: {sorted(loras)}; status: {html}"
    assert Path(loras[lora_name]["path"]).is_file()
    assert loras[lora_name]["metadata"].get("ss_base_model_version") == BASE_MODEL_VERSION[checkpoint]

    after = webui.txt2img(prompt)
    assert np.array_equal(base, after), "the WebUI's model changed by the training (base image differs)"
    with_lora = webui.txt2img(f"{prompt} <lora:{lora_name}:1>")
    difference = float(np.abs(with_lora.astype(np.float64) - base.astype(np.float64)).mean())
    print(f"{checkpoint}: mean abs pixel difference with <lora:{lora_name}:1>: {difference:.3f} (0-255 scale)")
    assert difference > 1.0, f"the LoRA barely changed the image ({difference:.3f})"
    assert np.array_equal(base, webui.txt2img(prompt)), "the base image changed after a generation with the LoRA"
    assert "didn't match keys" not in webui.log.read_text(encoding="utf-8", errors="replace")


def test_another_extensions_trainer_package_stays_its_own(webui: WebUI) -> None:
    """The other extension's script imported its own top-level `trainer`, and still gets it after ours loaded."""
    package = webui.request(OTHER_TRAINER_ROUTE)
    assert package["owner"] == "other-trainer", package
    for path in (package["at_load"], package["now"]):
        assert Path(path).parent.parent.name == "other-trainer", package
