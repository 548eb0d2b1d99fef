"""End to end in headless Chromium: the standalone UI trains the tiny model, shows progress, runs queued jobs in order.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (never `playwright install`).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from traintrain.demo import write_sample_images

CHROMIUM = os.environ.get("TRAINTRAIN_CHROMIUM", "/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright to run the browser test")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no browser at {CHROMIUM} (apt-get install chromium)"),
]
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
HELPER = Path(__file__).with_name("browser_app.py")
TIMEOUT_MS = 60_000
TRAINING_TIMEOUT_S = 600  # a deadline, not a speed check: CI machines may be slow and shared


SHOWN_OPACITY = """selector => {
    let opacity = 1;
    for (let node = document.querySelector(selector); node; node = node.parentElement) {
        opacity *= Number(getComputedStyle(node).opacity);
    }
    return opacity;
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The standalone UI in a subprocess; yields (url, root folder)."""
    root, port = tmp_path / "app", _free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(HELPER), str(root), str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the UI did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.5)
    yield url, root
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture
def page(tmp_path):
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )  # fmt: skip
        yield context.new_page()
        context.close()


def fill(page, key: str, value: str) -> None:
    page.locator(f"#tt_{key} textarea, #tt_{key} input").first.fill(value)


def choose(page, key: str, value: str) -> None:
    box = page.locator(f"#tt_{key} input").first
    box.click()
    box.fill(value)
    box.press("Enter")


def status_text(page) -> str:
    return page.locator("#tt_status .tt-status").inner_text()


def wait_until(read, done, what: str):
    """Call `read()` until `done(value)`; fail with the last value after the timeout."""
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while time.monotonic() < deadline:
        value = read()
        if done(value):
            return value
        time.sleep(0.2)
    pytest.fail(f"never saw {what}; last saw {value!r}")


def wait_for_status(page, text: str, seen: list[str]) -> None:
    """Poll the status box (the page refreshes it itself) until it contains `text`; keep what it showed."""
    wait_until(lambda: seen.append(status_text(page)) or seen[-1], lambda shown: text in shown, f"status {text!r}")


def queue_rows(page) -> list[str]:
    """The queue table's body rows as shown. gradio 4 also keeps a hidden copy of the first rows (to size the
    columns) before the table it shows, so read the last table only."""
    return page.locator("#tt_queue_table table").last.locator("tbody tr").all_inner_texts()


def finished_rows(page) -> list[str]:
    """The queue table's rows of finished jobs."""
    return [row for row in queue_rows(page) if "done" in row]


def open_tab(page, name: str) -> None:
    page.locator(".tab-nav button, button[role='tab']", has_text=re.compile(rf"^\s*{name}\s*$")).first.click()


def test_train_and_queue_in_the_browser(server, page, tmp_path):
    url, root = server
    images = write_sample_images(tmp_path / "images")
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#tt_status .tt-status")
    assert "Idle." in status_text(page)
    assert page.evaluate("typeof window.traintrainRefreshStatus") == "function"  # javascript/traintrain.js is loaded
    assert not page.locator("#tt_status_refresh").is_visible()  # style.css is applied (.tt-hidden)

    fill(page, "lora_data_directory", str(images))
    fill(page, "image_size", "64")
    fill(page, "image_min_length", "64")
    choose(page, "image_buckets_step", "64")
    fill(page, "train_iterations", "400")
    fill(page, "train_batch_size", "1")
    fill(page, "train_learning_rate", "1e-3")
    fill(page, "save_lora_name", "browser")
    page.locator("#tt_logging_save_csv input").check()
    page.locator("#tt_start").click()
    page.wait_for_function("document.querySelector('#tt_message textarea').value.includes(\"Started 'browser'\")")
    seen: list[str] = []
    wait_for_status(page, "step ", seen)
    for _ in range(30):  # style.css keeps the polled box from fading while a refresh is pending (gradio 4)
        assert page.evaluate(SHOWN_OPACITY, "#tt_status .tt-status") == 1
        time.sleep(0.1)
    wait_for_status(page, "browser.safetensors", seen)
    assert any("Training 'browser'" in text for text in seen)
    steps = [text for text in seen if "step " in text and "/400" in text]
    assert steps, f"no progress step was shown: {seen[-5:]}"
    assert f"Successfully created {root / 'output' / 'browser.safetensors'}" in seen[-1]
    assert (root / "output" / "browser.safetensors").is_file()
    page.screenshot(path=str(tmp_path / "train.png"), full_page=True)

    open_tab(page, "Plot")
    page.locator("#tt_plot_reload").click()
    page.wait_for_function("document.querySelector('#tt_plot_message textarea').value.includes('Showing ')")
    page.locator("#tt_plot img").first.wait_for(state="visible")  # the matplotlib figure
    open_tab(page, "Train")

    fill(page, "train_iterations", "150")
    for name in ("queued-1", "queued-2"):
        fill(page, "save_lora_name", name)
        page.locator("#tt_add_queue").click()
        page.wait_for_function(f"document.querySelector('#tt_message textarea').value.includes(\"Added '{name}'\")")
    open_tab(page, "Queue")
    page.locator("#tt_queue_run").click()
    wait_until(lambda: queue_rows(page), lambda rows: any("running" in r for r in rows), "a running job in the table")
    wait_for_status(page, "queued-2.safetensors", seen)
    rows = wait_until(lambda: finished_rows(page), lambda rows: len(rows) == 3, "three finished jobs")
    # finished jobs are listed newest first: queued-1 ran before queued-2
    assert [row.split()[0] for row in rows] == ["queued-2", "queued-1", "browser"]
    first, second = (root / "output" / f"queued-{i}.safetensors" for i in (1, 2))
    assert first.stat().st_mtime <= second.stat().st_mtime
    page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)
    if os.environ.get("TRAINTRAIN_SCREENSHOTS"):
        for shot in ("train.png", "queue.png"):
            shutil.copy(tmp_path / shot, Path(os.environ["TRAINTRAIN_SCREENSHOTS"]) / shot)


def test_ileco_previews_in_the_browser(server, page):
    url, _ = server
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#tt_status .tt-status")
    assert not page.locator("#tt_preview_all").is_visible()  # LoRA mode: no previews
    page.locator("#tt_mode label", has_text="iLECO").click()
    page.locator("#tt_preview_all").wait_for(state="visible")
    fill(page, "original_prompt", "a red circle")
    fill(page, "image_size", "64")
    page.locator("#tt_preview_all").click()
    page.wait_for_function("document.querySelector('#tt_message textarea').value.includes('Preview drawn (seed ')")
    for gallery in ("#tt_gallery_original", "#tt_gallery_target"):
        page.locator(f"{gallery} img").first.wait_for(state="visible")
    page.locator("#tt_mode label", has_text="LoRA").first.click()
    page.locator("#tt_preview_all").wait_for(state="hidden")


def test_image_tab_upload_in_the_browser(server, page, tmp_path):
    url, _ = server
    source = sorted(write_sample_images(tmp_path / "images").glob("*.png"))[0]
    out = tmp_path / "variants"
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#tt_status .tt-status")
    open_tab(page, "Image")
    page.locator("#tt_img_input input[type='file']").set_input_files(str(source))
    page.locator("#tt_img_input img").first.wait_for(state="visible")  # the upload reached the server and came back
    page.locator("#tt_img_count input[type='number']").fill("3")
    page.locator("#tt_img_count input[type='number']").press("Enter")
    fill(page, "img_seed", "7")
    fill(page, "img_name", "upload")
    fill(page, "img_out", str(out))
    page.locator("#tt_img_from_file").click()
    page.wait_for_function("document.querySelector('#tt_img_message textarea').value.includes('Wrote 3 image(s)')")
    assert sorted(p.name for p in out.iterdir()) == [f"upload_id_{i}.png" for i in range(3)]


def test_difference_images_and_presets_in_the_browser(server, page, tmp_path):
    url, root = server
    source = sorted(write_sample_images(tmp_path / "images").glob("*.png"))[0]
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#tt_status .tt-status")
    assert not page.locator("#tt_2nd_pass").is_visible()
    page.locator("#tt_mode label", has_text="Difference").click()
    page.locator("#tt_2nd_pass").wait_for(state="visible")  # the accordion a mode change shows
    page.locator("#tt_original_image input[type='file']").set_input_files(str(source))
    page.locator("#tt_original_image img").first.wait_for(state="visible")
    fill(page, "save_lora_name", "diff-preset")
    page.locator("#tt_preset_save").click()
    page.wait_for_function("document.querySelector('#tt_message textarea').value.includes('Preset saved')")
    assert page.locator("#tt_preset input").first.input_value() == "diff-preset"  # the dropdown's new choice
    saved = json.loads((root / "presets" / "diff-preset.json").read_text())
    assert saved["mode"] == "Difference" and Path(saved["original image"]).is_file()  # the upload, kept as a PNG
