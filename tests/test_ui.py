"""The UI under gradio 3.41: Blocks build, handlers called directly (presets, start / add, queue, plot, image tabs)."""

import gradio as gr
import pytest
from PIL import Image, ImageChops

from traintrain.config import TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.jobs import JobQueue, OpenModelProvider, QueueStatus, shared_queue
from traintrain.modes import OutputDirs
from traintrain.progress import Progress
from traintrain.ui import TrainTrainUI, build_ui
from traintrain.ui.handlers import shows_errors
from traintrain.ui.status import QUEUE_HEADERS, render_status

WAIT = 120


@pytest.fixture(scope="module")
def provider():
    return OpenModelProvider("tiny")


@pytest.fixture
def ui(tmp_path, provider):
    dirs = OutputDirs(tmp_path / "lora", tmp_path / "logs", tmp_path / "jsons")
    queue = JobQueue(provider, dirs, tmp_path / "queue.json")
    app = TrainTrainUI(queue, tmp_path / "presets", model_choices=lambda: ["", "tiny"])
    yield app
    queue.close(timeout=WAIT)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"))


def difference_config(tmp_path):
    original, target = tmp_path / "open.png", tmp_path / "closed.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(original)
    Image.new("RGBA", (64, 64), (10, 10, 200, 128)).save(target)
    second = TrainConfig(mode="Difference", network_rank=4, network_alpha=4.0, train_learning_rate=1e-4)
    return TrainConfig(
        mode="Difference", network_rank=32, network_alpha=0.5, train_optimizer="Lion",
        train_optimizer_settings={"weight_decay": 0.01, "betas": (0.9, 0.99)}, image_size=(512, 768),
        network_blocks=["BASE", "IN01", "OUT11"], train_seed=7, save_lora_name="diff", use_2nd_pass_settings=True,
        original_prompt="a face", target_prompt="a face, closed eyes", lora_trigger_word="closed eyes",
        original_image=str(original), target_image=str(target), second_pass=second,
    )  # fmt: skip


def same_image(a, b):
    with Image.open(a) as first, Image.open(b) as second:
        return ImageChops.difference(first.convert("RGBA"), second.convert("RGBA")).getbbox() is None


def test_build_ui_returns_blocks_on_the_shared_queue(tmp_path, provider):
    dirs = OutputDirs(tmp_path / "l", tmp_path / "g", tmp_path / "j")
    blocks = build_ui(provider, dirs, tmp_path / "p", tmp_path / "q.json")
    queue = shared_queue(provider, dirs, tmp_path / "q.json")
    try:
        assert build_ui(provider, dirs, tmp_path / "p", tmp_path / "q.json") is not blocks  # a UI reload …
        assert shared_queue(provider, dirs, tmp_path / "q.json") is queue  # … keeps the queue and its worker
        ids = {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
        expected = "start stop stop_save add_queue status mode network_rank 2nd_network_rank original_image queue_table"
        assert {f"tt_{key}" for key in expected.split()} | {"tt_plot", "tt_img_input"} <= ids
        assert all(i.startswith("tt_") for i in ids)
    finally:
        queue.close(timeout=WAIT)


def test_rendered_inside_a_webui_like_page_it_polls_once(ui):
    with gr.Blocks() as page:
        with gr.Tab("TrainTrain"):
            ui.blocks.render()
    polling = [dep for dep in page.config["dependencies"] if dep.get("every") or "tick" in str(dep.get("targets"))]
    assert len(polling) == 2  # the status box and the queue table, each once


def test_default_widgets_give_the_default_config(ui):
    assert ui.params.read([widget.value for widget in ui.params.inputs]) == TrainConfig()


def test_show_then_read_gives_the_same_difference_settings(ui, tmp_path):
    config = difference_config(tmp_path)
    values = ui.params.show(config)
    assert any(isinstance(v, Image.Image) for v in values)  # the images are shown, not their paths
    back = ui.params.read(values)
    assert same_image(back.original_image, config.original_image) and back.original_image.endswith(".png")
    assert same_image(back.target_image, config.target_image)
    back.original_image, back.target_image = config.original_image, config.target_image
    assert back.to_json_dict() == config.to_json_dict()
    assert back.second_pass.network_rank == 4 and back.use_2nd_pass_settings


def test_unreadable_values_are_listed_together(ui):
    values = ui.params.show(TrainConfig())
    names = list(ui.params.first) + list(ui.params.second)
    values[names.index("train_iterations")] = "many"
    values[len(ui.params.first) + list(ui.params.second).index("train_batch_size")] = "2.5"
    with pytest.raises(TrainTrainError) as error:
        ui.params.read(values)
    assert "'train iterations'" in str(error.value) and "2nd pass: 'train batch size'" in str(error.value)


def test_preset_save_then_load_round_trip_leaves_the_queue_alone(ui, tmp_path, images):
    ui.queue.add(demo_config(images, 4))
    config = difference_config(tmp_path)
    config.save_lora_name = "my/preset"  # sanitized to a file name inside presets/
    update, message = ui.presets.save(False, *ui.params.show(config))
    assert (tmp_path / "presets" / "my_preset.json").is_file() and message.startswith("Preset saved")
    assert update["value"] == "my_preset" and "my_preset" in update["choices"]
    *values, message = ui.presets.load("my_preset")
    assert message == "Loaded preset my_preset."
    loaded = ui.params.read(values)
    assert loaded.train_optimizer_settings == config.train_optimizer_settings
    assert loaded.second_pass.network_rank == 4 and loaded.network_blocks == ["BASE", "IN01", "OUT11"]
    assert [(e.name, e.state) for e in ui.queue.entries()] == [("demo", "paused")]  # not drained (original bug)
    assert not ui.queue.status().running


def test_load_saved_settings_from_jsons(ui, tmp_path, images):
    config = demo_config(images, 5)
    config.save_json(tmp_path / "jsons" / "20250101" / "demo-20250101_120000.json")
    *values, message = ui.presets.load_json("demo-20250101_120000")
    assert ui.params.read(values) == config and "demo-20250101_120000.json" in message
    for name in ("../secrets", "a/b"):
        with pytest.raises(TrainTrainError, match="plain file name"):
            ui.presets.load_json(name)
    assert shows_errors(ui.presets.load, 3)("")[-1] == "Error: Choose a preset first."


def test_mode_change_shows_each_modes_fields(ui):
    names = list(ui.params.first)

    def shown(mode):
        updates = ui.params.visibility(mode)
        return {n for n, u in zip(names, updates) if u["visible"]}, updates[-1]["visible"]

    lora, lora_second = shown("LoRA")
    ileco, _ = shown("iLECO")
    difference, difference_second = shown("Difference")
    assert {"lora_data_directory", "image_size", "mode", "model"} <= lora and "original_prompt" not in lora
    assert {"original_prompt", "target_prompt", "negative_prompt"} <= ileco and "lora_data_directory" not in ileco
    assert {"original_image", "target_image", "diff_1st_pass_only"} <= difference
    assert (lora_second, difference_second) == (False, True)


def test_start_trains_and_the_status_shows_the_result(ui, images, tmp_path):
    values = ui.params.show(demo_config(images, 4))
    assert ui.start(*values) == "Started 'demo'."
    assert ui.queue.wait_idle(WAIT)
    html = ui.status_html()
    assert f"Successfully created {tmp_path / 'lora' / 'demo.safetensors'}" in html and "Idle." in html
    figure, message = ui.plot_panel.reload("")  # the run's CSV log
    assert message.startswith("Showing demo-") and len(figure.axes[0].get_lines()[0].get_xdata()) == 4
    row = ui.queue_panel.rows()[0]
    assert row[:2] == ["demo", "LoRA"] and row[QUEUE_HEADERS.index("Status")] == "done"


def test_add_to_queue_refuses_a_duplicate_and_the_queue_tab_runs_it(ui, images):
    values = ui.params.show(demo_config(images, 4))
    assert ui.add(*values).startswith("Added 'demo'")
    assert shows_errors(ui.add)(*values).startswith("Error: Duplicated LoRA name 'demo'")
    rows, message = ui.queue_panel.run()
    assert message == "Running the queue (1 job(s))." and rows[0][0] == "demo"
    assert ui.queue.wait_idle(WAIT)
    assert ui.queue_panel.rows()[0][QUEUE_HEADERS.index("Status")] == "done"
    _, message = shows_errors(ui.queue_panel.remove, 1)("demo")
    assert message.startswith("Error: No queued job is named 'demo'")


def test_invalid_settings_show_every_problem(ui):
    message = shows_errors(ui.start)(*ui.params.show(TrainConfig(train_iterations=0)))
    assert message.startswith("Error: Please fix these settings:") and "'train iterations'" in message
    assert "'lora data directory'" in message


def test_plot_tab_refuses_paths(ui):
    plot, message = shows_errors(ui.plot_panel.reload, 1)("../x.csv")
    assert isinstance(plot, dict) and "not a plain file name" in message


def test_image_tab_writes_rgba_pngs(ui, tmp_path):
    image = Image.new("RGB", (40, 30), (0, 128, 0))
    message = ui.image_panel.run_file(image, "leaf", str(tmp_path / "aug"), 3, True, 90, True, 0.5, "left", 1)
    assert message == f"Wrote 3 image(s) to {tmp_path / 'aug'} (seed 1)."
    for i in range(3):
        with Image.open(tmp_path / "aug" / f"leaf_id_{i}.png") as out:
            assert (out.mode, out.size) == ("RGBA", (40, 30))
    assert shows_errors(ui.image_panel.run_file)(None, "x", "y", 1, True, 9, True, 0.5, "none", 1) == (
        "Error: Upload an image first."
    )


def test_status_html_has_a_progress_bar(ui):
    status = ui.queue.status()
    running = QueueStatus(
        running=True,
        current="demo",
        progress=Progress(5, 20, 0.1234, 1e-4, 3.0, 9.0),
        message="",
        queued=2,
        paused=False,
        results=(),
    )
    html = render_status(running)
    assert 'style="width:25.0%"' in html and "step 5/20" in html and "ETA 0:00:09" in html
    assert "2 job(s) queued" in html and 'data-state="running"' in html
    assert isinstance(gr.HTML(render_status(status)), gr.HTML)


def test_queue_table_shows_each_jobs_main_settings(ui, tmp_path, images):
    """Mode, model, rank, steps and lr per row, as the original's queue table; Difference shows both passes."""
    from traintrain.ui.status import queue_rows

    ui.queue.add(demo_config(images, 4))
    ui.queue.add(difference_config(tmp_path))
    assert QUEUE_HEADERS[:6] == ["Name", "Mode", "Model", "Rank", "Steps", "LR"]
    demo, diff = queue_rows(ui.queue)
    assert demo[:7] == ["demo", "LoRA", "(default)", "8", "4", "0.005", "paused"]
    assert diff[:6] == ["diff", "Difference", "(default)", "32 / 4", "1000", "0.0001"]
