"""The gradio-version differences in `traintrain/ui/compat.py`, checked on whichever gradio this venv has (CI runs
the suite on gradio 3.41 and on gradio 4.40)."""

import json
import socket
import urllib.request

import gradio as gr

from traintrain.ui import compat
from traintrain.ui.standalone import launch, page_assets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode("utf-8")


def test_standalone_page_serves_the_extension_css_and_script(tmp_path):
    port = _free_port()
    blocks = launch("127.0.0.1", port, root=tmp_path, block=False)
    try:
        page = _get(f"http://127.0.0.1:{port}/")
        config = json.loads(_get(f"http://127.0.0.1:{port}/config"))
    finally:
        blocks.close()
    css, head = page_assets()
    served_head = page if compat.GRADIO_MAJOR < 4 else config["head"]  # gradio 3: in the HTML; 4: the page adds it
    assert head in served_head and "traintrainRefreshStatus" in head
    assert config["css"] == css and ".tt-hidden" in css


def test_queue_table_is_read_only_and_height_limited():
    with gr.Blocks():
        table = compat.table(["A", "B"], "tt_test_table", "Test", value=lambda: [["1", "2"]], every=5.0)
    assert table.interactive is False
    assert getattr(table, "max_height", None) == 400 or table.height == 400


def test_image_input_takes_uploads_only_as_pil():
    with gr.Blocks():
        image = compat.image_input("Image", "tt_test_image")
    sources = image.sources if compat.GRADIO_MAJOR >= 4 else [image.source]
    assert sources == ["upload"] and image.type == "pil" and image.image_mode == "RGBA"
