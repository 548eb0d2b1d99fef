"""iLECO previews: the requests, the standalone sampler (checked against an oracle model), the provider's refusal while
a job holds the model, and the Generate buttons' handlers."""

from __future__ import annotations

import threading

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from traintrain.config import TrainConfig
from traintrain.data.images import to_pixels
from traintrain.errors import TrainTrainError
from traintrain.jobs import JobQueue, OpenModelProvider
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs
from traintrain.previews import PREVIEW_BUSY, PreviewRequest, draw, preview_requests
from traintrain.ui import TrainTrainUI

ILECO = dict(
    mode="iLECO", original_prompt="a red circle", target_prompt="", negative_prompt="blurry", image_size=(64, 128)
)


def test_requests_share_one_seed_and_take_the_ileco_settings() -> None:
    both = preview_requests(TrainConfig(**ILECO), "all")
    assert [r.prompt for r in both] == ["a red circle", ""] and both[0].seed == both[1].seed
    assert {(r.height, r.width, r.negative_prompt) for r in both} == {(64, 128, "blurry")}
    assert [r.prompt for r in preview_requests(TrainConfig(**ILECO), "target", seed=5)] == [""]
    with pytest.raises(TrainTrainError, match="Original Prompt"):
        preview_requests(TrainConfig(**{**ILECO, "original_prompt": " "}), "original")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_sampler_lands_on_what_an_exact_model_knows(prediction: str) -> None:
    """With a model that knows the clean latents exactly (its ε or v follow from them), DDIM ends on them: the
    preview is the decoded image itself (to the 8-bit rounding)."""
    bundle = build_tiny("sd1")
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    with torch.no_grad():
        clean = bundle.encode_images(to_pixels(image)[None])
        expected = ((bundle.decode_latents(clean)[0] + 1) * 127.5).permute(1, 2, 0).numpy()

    def exact(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        a = bundle.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * clean) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * clean

    bundle.prediction, bundle.predict = prediction, exact
    drawn = np.asarray(draw(bundle, PreviewRequest("a red circle", "", 64, 64, seed=0)), dtype=float)
    assert np.abs(drawn - expected).max() <= 0.51


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_same_seed_same_preview(kind: str) -> None:
    bundle = build_tiny(kind)
    request = PreviewRequest("a red circle", "", 64, 96, seed=3)
    first, again = draw(bundle, request), draw(bundle, request)
    assert first.size == (64, 96) and np.array_equal(np.asarray(first), np.asarray(again))
    other = draw(bundle, PreviewRequest("a red circle", "", 64, 96, seed=4))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_standalone_previews_wait_for_no_job() -> None:
    provider = OpenModelProvider("tiny")
    config = TrainConfig(**ILECO)
    images = provider.preview(config, preview_requests(config, "all"))
    assert [image.size for image in images] == [(128, 64)] * 2
    holding, release = threading.Event(), threading.Event()

    def job() -> None:
        with provider.open(config):
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=job)
    worker.start()
    holding.wait(30)
    try:
        with pytest.raises(TrainTrainError, match="training is using the model"):
            provider.preview(config, preview_requests(config, "original"))
    finally:
        release.set()
        worker.join()
    assert PREVIEW_BUSY.startswith("A training")


def test_generate_buttons_fill_their_galleries(tmp_path) -> None:
    dirs = OutputDirs(tmp_path / "l", tmp_path / "g", tmp_path / "j")
    queue = JobQueue(OpenModelProvider("tiny"), dirs, tmp_path / "q.json")
    try:
        ui = TrainTrainUI(queue, tmp_path / "presets")
        values = ui.params.show(TrainConfig(**ILECO))
        original, target, message = ui.previews.generate(ui.params, queue.provider, "all")(*values)
        assert len(original) == len(target) == 1 and original[0].size == (128, 64)
        assert message.startswith("Preview drawn (seed ")
        original, target, _ = ui.previews.generate(ui.params, queue.provider, "target")(*values)
        assert original == gr.update() and len(target) == 1  # the Original gallery stays as it was
    finally:
        queue.close(timeout=60)
