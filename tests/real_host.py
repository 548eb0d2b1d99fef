"""HTTP access to a real WebUI started by a test: its REST API and its gradio page, driven as the browser drives it.

Gradio 3 events are called through `/run/predict` (fn_index); gradio 4 (Forge) accepts UI events only through its
queue, as its browser client does: `POST /queue/join`, then the server-sent events of `GET /queue/data` until the
event's `process_completed` message.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

BASE_IMAGE = {"seed": 1234, "width": 64, "height": 64, "cfg_scale": 5, "sampler_name": "Euler", "batch_size": 1}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HostServer:
    """The started WebUI process, its log and its REST API."""

    def __init__(self, port: int, process: subprocess.Popen, log: Path) -> None:
        self.base, self.process, self.log = f"http://127.0.0.1:{port}", process, log

    def request(self, path: str, payload: Any = None, timeout: float = 900) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def wait_until(self, ready: Callable[["HostServer"], bool], timeout: float, what: str) -> None:
        """Poll `ready` (HTTP errors count as not yet) until it holds; fail with the log if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"The WebUI exited ({self.process.returncode}) before {what}:\n{self.log_tail()}")
            try:
                if ready(self):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(3)
        pytest.fail(f"No {what} within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)

    def txt2img(self, prompt: str, steps: int) -> np.ndarray:
        """The RGB pixels of one `BASE_IMAGE` generation of `prompt` (fixed seed, not saved)."""
        payload = {**BASE_IMAGE, "prompt": prompt, "negative_prompt": "", "steps": steps, "n_iter": 1}
        image = self.request("/sdapi/v1/txt2img", {**payload, "save_images": False})["images"][0]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[-1]))).convert("RGB"))


class GradioApp:
    """The page's gradio app: components by elem_id, events called as the browser calls them (gradio 3 or 4)."""

    def __init__(self, server: HostServer) -> None:
        self.server = server
        config = server.request("/config")
        self.gradio4 = not str(config.get("version", "3")).startswith("3")
        self.components = {c["id"]: c for c in config["components"]}
        self.dependencies = config["dependencies"]

    def elem_id(self, component_id: int) -> str:
        return self.components.get(component_id, {}).get("props", {}).get("elem_id") or ""

    def has(self, elem_id: str) -> bool:
        return any(self.elem_id(c) == elem_id for c in self.components)

    def event(self, elem_id: str, trigger: str = "click") -> tuple[int, int, list[int]]:
        """(fn index, target component id, input component ids) of the `trigger` event of the component `elem_id`."""
        for index, dependency in enumerate(self.dependencies):
            pairs = [
                t if isinstance(t, list) else [t, dependency.get("trigger")] for t in dependency.get("targets", [])
            ]  # gradio 3: ids + "trigger"; 4: [id, trigger] pairs
            for target, kind in pairs:
                if self.elem_id(target) == elem_id and kind == trigger:
                    return dependency.get("id", index), target, list(dependency["inputs"])
        raise AssertionError(f"No {trigger} event on #{elem_id} in the page")

    def call(self, event: tuple[int, int, list[int]], data: list[Any], timeout: float = 900) -> list[Any]:
        """The outputs of `event` called with `data`."""
        fn_index, target = event[0], event[1]
        if not self.gradio4:
            body = {"fn_index": fn_index, "data": data, "session_hash": "ttcheck"}
            return self.server.request("/run/predict", body, timeout)["data"]
        session = uuid.uuid4().hex
        body = {"data": data, "event_data": None, "fn_index": fn_index, "trigger_id": target, "session_hash": session}
        event_id = self.server.request("/queue/join", body, timeout)["event_id"]
        url = f"{self.server.base}/queue/data?session_hash={session}"
        with urllib.request.urlopen(url, timeout=timeout) as stream:
            for raw in stream:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[len("data:") :])
                if message.get("event_id", event_id) != event_id or message.get("msg") != "process_completed":
                    continue
                output = message.get("output") or {}
                assert message.get("success"), f"the event failed: {output.get('error') or output}"
                return output["data"]
        raise AssertionError(f"The queue stream closed without completing event {fn_index}")
