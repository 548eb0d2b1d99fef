"""The UI and CLI under hostile input: one message before any model work, bounded handler inputs, protected presets,
a login for a served UI; a property test over every handler's inputs (only messages, never a traceback)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from traintrain.__main__ import main
from traintrain.config import TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.jobs import JobQueue, OpenModelProvider
from traintrain.modes import OutputDirs
from traintrain.ui import TrainTrainUI
from traintrain.ui.handlers import shows_errors
from traintrain.ui.standalone import check_exposure, parse_auth

BAD_OPTIMIZER = {"train_optimizer_settings": {"foo": 1}}
BAD_SCHEDULER = {"train_lr_scheduler": "step", "train_lr_scheduler_settings": {"step_size": "a"}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def ui(tmp_path):
    dirs = OutputDirs(tmp_path / "lora", tmp_path / "logs", tmp_path / "jsons")
    queue = JobQueue(OpenModelProvider("tiny"), dirs, tmp_path / "queue.json", console=False)
    yield TrainTrainUI(queue, tmp_path / "presets", model_choices=lambda: ["", "tiny"])
    queue.close(timeout=120)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"train_optimizer_settings": {"weight_decay": "abc"}}, "AdamW refused its settings"),
        ({"train_optimizer_settings": {"betas": (2, 3, 4)}}, "Invalid beta parameter"),
        (BAD_OPTIMIZER, "AdamW has no setting foo"),
        (BAD_SCHEDULER, "refused the settings"),
        ({"train_lr_scheduler": "polynomial", "train_lr_scheduler_settings": {"lr_end": 1.0}}, "lr_end"),
    ],
)
def test_optimizer_and_scheduler_values_are_checked_before_the_model_loads(tmp_path, images, capsys, monkeypatch,
                                                                           changes, words) -> None:  # fmt: skip
    import traintrain.models.open as open_module

    monkeypatch.setattr(open_module, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = dataclasses.replace(demo_config(images, 3), vae=str(tmp_path / "missing.vae.pt"), **changes)
    config.save_json(tmp_path / "bad.json")
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and words in err and "'VAE'" in err, "one message, every problem"


def test_the_standalone_queue_refuses_a_missing_model_path_when_added(ui, images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, 3), model=str(tmp_path / "nope.safetensors"), **BAD_OPTIMIZER)
    with pytest.raises(TrainTrainError) as caught:
        ui.queue.add(config)
    assert "'Model'" in str(caught.value) and "foo" in str(caught.value)


def test_the_tab_reports_unreadable_and_out_of_range_values_in_one_message(ui) -> None:
    values = ui.params.show(TrainConfig(train_learning_rate=-1, network_rank=0, **BAD_SCHEDULER))
    values[list(ui.params.first).index("train_iterations")] = "many"
    message = shows_errors(ui.add)(*values)
    for words in ("'train iterations'", "'train learning rate' must be above 0", "'network rank' must be at least 1"):
        assert words in message, message
    assert "iterations' must be" not in message, "no range message about a value that could not be read"


# ----- presets


def test_save_preset_refuses_to_replace_one_without_the_tick(ui) -> None:
    values = ui.params.show(TrainConfig(save_lora_name="mine", network_rank=4))
    assert shows_errors(ui.presets.save, 1)(False, *values)[1].startswith("Preset saved")
    values = ui.params.show(TrainConfig(save_lora_name="mine", network_rank=8))
    assert "tick 'Overwrite preset'" in shows_errors(ui.presets.save, 1)(False, *values)[1]
    assert TrainConfig.load_json(ui.presets.presets_dir / "mine.json").network_rank == 4, "not replaced"
    assert shows_errors(ui.presets.save, 1)(True, *values)[1].startswith("Preset saved")
    assert TrainConfig.load_json(ui.presets.presets_dir / "mine.json").network_rank == 8


@pytest.mark.parametrize("name", ["LoRA", "lora", "iLECO", "Difference_Use2ndPass"])
def test_a_shipped_preset_is_never_replaced(ui, name) -> None:
    message = shows_errors(ui.presets.save, 1)(True, *ui.params.show(TrainConfig(save_lora_name=name)))[1]
    assert "comes with TrainTrain" in message and not (ui.presets.presets_dir / f"{name}.json").exists()


def test_the_shipped_list_names_every_shipped_preset() -> None:
    from traintrain.ui.presets import SHIPPED_LIST, shipped_presets

    shipped = {path.stem.casefold() for path in SHIPPED_LIST.parent.glob("*.json")}
    assert shipped and shipped == shipped_presets()


# ----- the Image tab and the standalone server


def test_image_tab_bounds_its_inputs_on_the_server(ui, tmp_path) -> None:
    image = Image.new("RGB", (16, 16))
    run = shows_errors(ui.image_panel.run_file)
    out = str(tmp_path / "aug")
    assert "'number of images' must be a whole number from 0 to 1000" in run(image, "x", out, 1001, True, 9, True, 0.5, "none", 1)
    assert "'number of images'" in run(image, "x", out, "abc", True, 9, True, 0.5, "none", 1)
    assert "'fix side'" in run(image, "x", out, 2, True, 9, True, 0.5, "diagonal", 1)
    assert "'minimum downscale ratio'" in run(image, "x", out, 2, True, 9, True, float("nan"), "none", 1)
    assert "'seed'" in run(image, "x", out, 2, True, 9, True, 0.5, "none", "1e400")
    assert not (tmp_path / "aug").exists()


def test_image_variants_are_written_one_at_a_time(ui, tmp_path, monkeypatch) -> None:
    import traintrain.augment as augment

    alive, most = [0], [0]
    real = augment._variant

    def counting(*args):
        variant = real(*args)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return variant

    real_save = Image.Image.save

    def save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        alive[0] -= 1

    monkeypatch.setattr(augment, "_variant", counting)
    monkeypatch.setattr(Image.Image, "save", save)
    message = ui.image_panel.run_file(Image.new("RGB", (16, 16)), "s", str(tmp_path), 20, True, 9, True, 0.5, "none", 1)
    assert message.startswith("Wrote 20 image(s)") and most[0] == 1, "never more than one variant in memory"


def test_serving_other_machines_needs_a_login() -> None:
    with pytest.raises(TrainTrainError, match="--auth user:password"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", ("anna", "pw"))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None)
    assert parse_auth("anna:pa:ss") == ("anna", "pa:ss")
    for bad in ("anna", ":pw", "anna:"):
        with pytest.raises(TrainTrainError, match="user:password"):
            parse_auth(bad)


def test_the_cli_refuses_an_open_host_without_auth(capsys) -> None:
    assert main(["ui", "--host", "0.0.0.0", "--port", "7999"]) == 2
    assert "--auth" in capsys.readouterr().err


# ----- every handler, any input: a message, never an exception

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(),
    st.text(max_size=30), st.just("9" * 400), st.lists(st.text(max_size=5), max_size=3),
    st.builds(lambda: Image.new("RGB", (8, 8))),
)  # fmt: skip


def handlers(ui: TrainTrainUI):
    """(name, handler wrapped as the page wires it, number of inputs, outputs besides the message)."""
    count = len(ui.params.inputs)
    return [
        ("start", shows_errors(ui.start), count, 0),
        ("add", shows_errors(ui.add), count, 0),
        ("stop", shows_errors(lambda go_on: ui.stop(False, go_on)), 1, 0),
        ("save preset", shows_errors(ui.presets.save, 1), count + 1, 1),
        ("load preset", shows_errors(ui.presets.load, count), 1, count),
        ("load settings", shows_errors(ui.presets.load_json, count), 1, count),
        ("remove", shows_errors(ui.queue_panel.remove, 1), 1, 1),
        ("plot", shows_errors(ui.plot_panel.reload, 1), 1, 1),
        ("image folder", shows_errors(ui.image_panel.run_folder), 8, 0),
        ("image file", shows_errors(ui.image_panel.run_file), 10, 0),
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_handler_answers_any_input_with_a_message(ui, data) -> None:
    name, handler, count, others = data.draw(st.sampled_from(handlers(ui)), label="handler")
    defaults = ui.params.show(TrainConfig(save_lora_name="fuzz"))
    if count >= len(defaults):  # the settings handlers: mostly sensible values, some replaced by anything
        values = ([False] if count > len(defaults) else []) + list(defaults)
        for index in data.draw(st.lists(st.integers(0, count - 1), max_size=4), label="replaced"):
            values[index] = data.draw(ANY_VALUE, label=f"value {index}")
    else:
        values = [data.draw(ANY_VALUE, label=f"value {i}") for i in range(count)]
    result = handler(*values)
    message = result[-1] if isinstance(result, (tuple, list)) else result
    assert isinstance(message, str), name
    ui.queue.stop(save=False)
    with ui.queue._lock:
        ui.queue._pending.clear()  # the next example starts with an empty queue


@pytest.mark.parametrize("value", [10**400, "9" * 400, float("inf"), float("nan"), [["x"]], {"a": 1}, object(), b"x"])
def test_any_value_in_any_settings_widget_is_read_or_refused_with_a_message(ui, value) -> None:
    for index, name in enumerate(ui.params.first):
        values = ui.params.show(TrainConfig())
        values[index] = value
        try:
            problems = ui.params.read(values).problems()
        except TrainTrainError as error:
            problems = [str(error)]
        assert all(isinstance(problem, str) for problem in problems), name


@pytest.mark.parametrize("mode", ["LoRA", "Difference", "nonsense", None, ["LoRA"], 5])
def test_a_mode_change_with_any_value_updates_the_page(ui, mode) -> None:
    updates = ui.params.visibility(mode)
    assert len(updates) == len(ui.params.visibility_outputs)


def test_the_status_box_says_loading_not_preparing_and_the_console_shows_each_step(tmp_path, images, capfd) -> None:
    import contextlib
    import threading

    from traintrain.models.tiny import build_tiny
    from traintrain.ui.status import render_status

    loading, go_on = threading.Event(), threading.Event()

    class SlowProvider:
        @contextlib.contextmanager
        def open(self, config):
            loading.set()
            go_on.wait(60)
            yield build_tiny("sd1")

    dirs = OutputDirs(tmp_path / "lora", tmp_path / "logs", tmp_path / "jsons")
    queue = JobQueue(SlowProvider(), dirs, tmp_path / "queue.json")
    try:
        queue.start(dataclasses.replace(demo_config(images, 3), save_lora_name="slow", logging_save_csv=False))
        assert loading.wait(60)
        html = render_status(queue.status())
        assert "loading the model" in html and "Preparing" not in html
        go_on.set()
        assert queue.wait_idle(120)
        assert "Successfully created" in render_status(queue.status()) and "Preparing" not in render_status(queue.status())
    finally:
        go_on.set()
        queue.close(timeout=120)
    assert "3/3" in capfd.readouterr().err, "a tqdm line with the steps on the console"
