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
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402

from traintrain.config import FIELD_BY_NAME  # noqa: E402
from traintrain.config_fields import IMAGE  # noqa: E402
from traintrain.demo import demo_config, write_sample_images  # noqa: E402
from traintrain.models.ldm_convert import save_single_file  # noqa: E402
from traintrain.models.tiny import VAE_CONFIG, SCALING_FACTOR, like_a_trained_vae, build_tiny_components  # noqa: E402
from traintrain.models.tokenizer import END, START, cache_dir, tiny_clip_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_NAME = "webui_check"
START_TIMEOUT = 900  # seconds: importing the WebUI on 2 shared cores is slow
TRAIN_TIMEOUT = 600
ITERATIONS = 30
CKPT = "tiny-sd1"

# A v1-inference.yaml with the tiny model's sizes. The UNet has SD's two layers per level (the Lora extension's
# diffusers-name converter assumes it); the VAE has 32 channels per level (ldm's GroupNorm has 32 groups).
YAML = """model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: "{clip}"
"""


def write_tiny_checkpoint(models: Path, clip_dir: Path) -> Path:
    """The tiny SD1 model as `<models>/Stable-diffusion/tiny-sd1.safetensors` + its yaml, and the text encoder's
    config and tokenizer files in `clip_dir` (FrozenCLIPEmbedder's `version`: a local folder, so nothing is fetched)."""
    components = build_tiny_components("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config({**components.unet.config, "layers_per_block": 2}).eval()
        vae_config = {**VAE_CONFIG, "block_out_channels": (32,) * 4, "norm_num_groups": 32}
        vae = like_a_trained_vae(AutoencoderKL(**vae_config, scaling_factor=SCALING_FACTOR["sd1"])).eval()
    components = dataclasses.replace(components, unet=unet, vae=vae)
    folder = models / "Stable-diffusion"
    folder.mkdir(parents=True)
    checkpoint = save_single_file(components, folder / f"{CKPT}.safetensors")
    (folder / f"{CKPT}.yaml").write_text(YAML.replace("{clip}", str(clip_dir)), encoding="utf-8")
    clip_dir.mkdir(parents=True)
    components.text_encoders[0].config.to_json_file(str(clip_dir / "config.json"))
    tiny_clip_tokenizer()
    for name in ("vocab.json", "merges.txt"):
        (clip_dir / name).write_bytes((cache_dir() / "tiny-char" / name).read_bytes())
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (clip_dir / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    settings = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (clip_dir / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return checkpoint


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
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"The WebUI exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                models = self.request("/sdapi/v1/sd-models", timeout=10)
                if any(m["model_name"] == CKPT for m in models):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(3)
        pytest.fail(f"The WebUI did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

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
    checkpoint = write_tiny_checkpoint(data / "models", data / "tiny-clip")
    url = os.environ.get("TRAINTRAIN_GIT_URL") or ROOT.as_uri()
    subprocess.run(["git", "clone", "--quiet", url, str(data / "extensions" / "traintrain")], check=True)
    port, log = free_port(), data / "webui.log"
    command = [
        python,
        "launch.py",
        "--skip-prepare-environment",
        "--skip-version-check",
        "--data-dir",
        str(data),
        "--ckpt",
        str(checkpoint),
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


def test_lora_trained_in_the_tab_changes_txt2img(webui: WebUI, tmp_path) -> None:
    prompt = "demo style, a picture"
    base = webui.txt2img(prompt)
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, webui.txt2img(prompt)), "txt2img is not deterministic for a fixed seed"

    app = GradioApp(webui)
    start, inputs = app.event("tt_start")
    status, _ = app.event("tt_status_refresh")
    config = demo_config(write_sample_images(tmp_path / "images"), iterations=ITERATIONS)
    config = dataclasses.replace(config, save_lora_name=LORA_NAME)
    message = app.call(start, setting_values(app, inputs, config))[0]
    assert message.startswith("Started"), message

    deadline, html = time.monotonic() + TRAIN_TIMEOUT, ""
    while time.monotonic() < deadline:
        html = app.call(status, [])[0]
        if 'data-state="idle"' in html:
            break
        time.sleep(2)
    assert 'data-state="idle"' in html, f"training did not finish in {TRAIN_TIMEOUT} s: {html}"
    assert "Error" not in html and "failed" not in html.lower(), html
    print("TrainTrain status:", re.sub(r"<[^>]+>", " ", html).split("Idle.")[-1].strip())

    webui.request("/sdapi/v1/refresh-loras", {})
    loras = {lora["name"]: lora for lora in webui.request("/sdapi/v1/loras")}
    assert LORA_NAME in loras, f"{LORA_NAME} not listed: {sorted(loras)}; status: {html}"
    assert Path(loras[LORA_NAME]["path"]).is_file()
    assert loras[LORA_NAME]["metadata"].get("ss_base_model_version") == "sd_v1"

    after = webui.txt2img(prompt)
    assert np.array_equal(base, after), "the WebUI's model changed by the training (base image differs)"
    with_lora = webui.txt2img(f"{prompt} <lora:{LORA_NAME}:1>")
    difference = float(np.abs(with_lora.astype(np.float64) - base.astype(np.float64)).mean())
    print(f"mean abs pixel difference with <lora:{LORA_NAME}:1>: {difference:.3f} (0-255 scale)")
    assert difference > 1.0, f"the LoRA barely changed the image ({difference:.3f})"
    assert np.array_equal(base, webui.txt2img(prompt)), "the base image changed after a generation with the LoRA"
    assert "didn't match keys" not in webui.log.read_text(encoding="utf-8", errors="replace")
