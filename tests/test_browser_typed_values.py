"""In headless Chromium: what is typed into the dropdowns that take typed values is what the queued job trains with,
whichever way the box is left (Enter, Tab, a click elsewhere), even when the key-up comes after the focus moved.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package, like test_browser.py (whose fixtures it uses).
"""

import json

import pytest
from test_browser import CHROMIUM, TIMEOUT_MS, fill, page, server  # noqa: F401 - fixtures

from traintrain.demo import write_sample_images

pytestmark = [pytest.mark.slow]

# field, keys typed, how the box is left, the value the page then shows and the job must get
CASES = [
    ("network_rank", "12", "Enter", "12"),  # gradio 3 alone: Enter picks the first option containing "12": 128
    ("network_alpha", "3", "Tab", "3"),  # key-up after the focus moved: gradio 3 alone keeps the old 8
    ("network_conv_rank", "24", "click", "24"),
    ("network_conv_alpha", "6", "Enter", "6"),  # gradio 3 alone: 0.0625
    ("image_buckets_step", "72", "Tab", "72"),
]


def type_and_leave(page, field: str, text: str, leave: str) -> None:  # noqa: F811 - the fixture's name
    """Type `text` into the dropdown, the last key held down while the box is left (a fast typist), then let go."""
    box = page.locator(f"#tt_{field} input").first
    box.click()
    box.fill("")
    page.keyboard.type(text[:-1])
    page.keyboard.down(text[-1])
    if leave == "click":
        page.locator("#tt_message").click()
    else:
        page.keyboard.press(leave)
    page.keyboard.up(text[-1])


def test_typed_dropdown_values_are_what_the_job_gets(server, page, tmp_path) -> None:  # noqa: F811 - fixtures
    assert CHROMIUM
    url, root = server
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#tt_status .tt-status")
    assert page.evaluate("typeof window.traintrainTypedValues") == "string"
    fill(page, "lora_data_directory", str(write_sample_images(tmp_path / "images")))
    fill(page, "save_lora_name", "typed")
    for field, text, leave, _ in CASES:
        type_and_leave(page, field, text, leave)
    shown = {field: page.locator(f"#tt_{field} input").first.input_value() for field, *_ in CASES}
    assert shown == {field: value for field, _, _, value in CASES}, "the page shows what was typed"
    page.locator("#tt_add_queue").click()
    page.wait_for_function("document.querySelector('#tt_message textarea').value.includes(\"Added 'typed'\")")
    (job,) = json.loads((root / "queue.json").read_text())["jobs"]
    assert {field: job[field] for field, *_ in CASES} == shown, "the job trains with what the page shows"
