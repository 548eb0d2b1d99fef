"""Job queue: duplicates refused, FIFO order around Start, remove, persistence, failures, stop; real tiny runs."""

import contextlib
import json
import threading

import pytest
import torch

from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain.jobs import OOM_MESSAGE, JobQueue, OpenModelProvider
from traintrain.modes import OutputDirs

WAIT = 120


@pytest.fixture(scope="module")
def tiny_provider():
    """One tiny model for the whole module (the provider reuses it across jobs)."""
    return OpenModelProvider("tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"))


class RecordingProvider:
    """The tiny model, recording which jobs opened it; optionally held at a gate or failing for chosen names."""

    def __init__(self, inner, failures=None):
        self.inner = inner
        self.failures = failures or {}
        self.opened: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    @contextlib.contextmanager
    def open(self, config):
        self.opened.append(config.effective_name)
        self.entered.set()
        assert self.gate.wait(WAIT)
        if config.effective_name in self.failures:
            raise self.failures[config.effective_name]
        with self.inner.open(config) as bundle:
            yield bundle


@pytest.fixture
def make_queue(tmp_path):
    queues = []

    def make(provider, file_name="queue.json"):
        queue = JobQueue(
            provider, OutputDirs(tmp_path / "lora", tmp_path / "logs", tmp_path / "jsons"), tmp_path / file_name
        )
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        queue.close(timeout=WAIT)


def job(images, name, iterations=4):
    config = demo_config(images, iterations=iterations)
    config.save_lora_name = name
    return config


def finished_order(queue):
    return [entry.name for entry in reversed(queue.status().results)]


def test_start_runs_a_real_training_and_reports_progress(make_queue, tiny_provider, images, tmp_path):
    queue = make_queue(RecordingProvider(tiny_provider))
    events = []
    unsubscribe = queue.subscribe(events.append)
    assert queue.start(job(images, "first")) == "Started 'first'."
    assert queue.wait_idle(WAIT)
    unsubscribe()
    status = queue.status()
    assert status.state == "idle" and status.current is None
    assert status.message == f"Successfully created {tmp_path / 'lora' / 'first.safetensors'}"
    assert (tmp_path / "lora" / "first.safetensors").is_file()
    assert [e.step for e in events] == [1, 2, 3, 4] and status.progress.step == 4
    assert status.results[0].state == "done"


def test_duplicate_names_are_refused(make_queue, tiny_provider, images):
    provider = RecordingProvider(tiny_provider)
    provider.gate.clear()
    queue = make_queue(provider)
    queue.start(job(images, "same"))
    assert provider.entered.wait(WAIT)
    with pytest.raises(TrainTrainError, match="Duplicated LoRA name 'same'"):
        queue.add(job(images, "same"))  # the running one
    queue.add(job(images, "other"))
    with pytest.raises(TrainTrainError, match="Duplicated LoRA name 'other'"):
        queue.add(job(images, "other"))  # a queued one
    with pytest.raises(TrainTrainError, match="press Stop first"):
        queue.start(job(images, "third"))
    provider.gate.set()
    assert queue.wait_idle(WAIT)
    assert finished_order(queue) == ["same", "other"]


def test_fifo_start_first_then_queued_then_added_during_the_run(make_queue, tiny_provider, images):
    provider = RecordingProvider(tiny_provider)
    queue = make_queue(provider)
    queue.add(job(images, "queued1"))
    queue.add(job(images, "queued2"))
    assert not provider.entered.wait(0.3)  # adding alone runs nothing
    provider.gate.clear()
    queue.start(job(images, "started"))
    assert provider.entered.wait(WAIT)
    queue.add(job(images, "during1"))
    queue.add(job(images, "during2"))
    assert [(e.name, e.state) for e in queue.entries()] == [
        ("started", "running"),
        ("queued1", "queued"),
        ("queued2", "queued"),
        ("during1", "queued"),
        ("during2", "queued"),
    ]
    provider.gate.set()
    assert queue.wait_idle(WAIT)
    assert finished_order(queue) == ["started", "queued1", "queued2", "during1", "during2"]
    assert queue.entries() == [] and queue.status().paused


def test_remove_by_name(make_queue, tiny_provider, images):
    provider = RecordingProvider(tiny_provider)
    provider.gate.clear()
    queue = make_queue(provider)
    queue.add(job(images, "a"))
    queue.add(job(images, "b"))
    assert queue.remove("a") == "Removed 'a' from the queue."  # the first entry too (an original bug)
    with pytest.raises(TrainTrainError, match="No queued job is named 'zzz'"):
        queue.remove("zzz")
    queue.start(job(images, "running"))
    assert provider.entered.wait(WAIT)
    with pytest.raises(TrainTrainError, match="use Stop"):
        queue.remove("running")
    assert [e.name for e in queue.entries()] == ["running", "b"]
    provider.gate.set()
    assert queue.wait_idle(WAIT)
    assert finished_order(queue) == ["running", "b"]


def test_queue_file_survives_a_restart_and_waits_for_run_queue(make_queue, tiny_provider, images, tmp_path):
    first = make_queue(RecordingProvider(tiny_provider))
    first.add(job(images, "x"))
    first.add(job(images, "y"))
    first.close(timeout=WAIT)
    saved = json.loads((tmp_path / "queue.json").read_text())
    assert [entry["save_lora_name"] for entry in saved["jobs"]] == ["x", "y"]

    provider = RecordingProvider(tiny_provider)
    second = make_queue(provider)
    assert [(e.name, e.state) for e in second.entries()] == [("x", "paused"), ("y", "paused")]
    assert "press Run queue" in second.status().message
    assert not provider.entered.wait(0.3) and not second.status().running
    second.run_queue()
    assert second.wait_idle(WAIT)
    assert finished_order(second) == ["x", "y"]
    assert json.loads((tmp_path / "queue.json").read_text()) == {"jobs": []}
    with pytest.raises(TrainTrainError, match="queue is empty"):
        second.run_queue()


def test_unreadable_queue_file_starts_empty_with_a_message(make_queue, tiny_provider, tmp_path):
    (tmp_path / "queue.json").write_text("{not json")
    queue = make_queue(RecordingProvider(tiny_provider))
    assert queue.entries() == [] and "Could not read the saved queue" in queue.status().message


@pytest.mark.parametrize(
    "error, message",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), OOM_MESSAGE),
        (RuntimeError("kaboom"), "Error: RuntimeError: kaboom"),
        (TrainTrainError("No model given: choose one."), "No model given: choose one."),
    ],
)
def test_a_failing_job_is_recorded_and_the_next_one_runs(make_queue, tiny_provider, images, error, message):
    provider = RecordingProvider(tiny_provider, failures={"boom": error})
    queue = make_queue(provider)
    queue.add(job(images, "after"))
    queue.start(job(images, "boom"))
    assert queue.wait_idle(WAIT)
    after, boom = queue.status().results
    assert (boom.name, boom.state, boom.message) == ("boom", "failed", f"boom: {message}")
    assert (after.name, after.state) == ("after", "done")


def test_invalid_settings_are_refused_before_queueing(make_queue, tiny_provider, images, tmp_path):
    queue = make_queue(RecordingProvider(tiny_provider))
    config = job(images, "bad")
    config.lora_data_directory = str(tmp_path / "missing")
    with pytest.raises(TrainTrainError, match="lora data directory"):
        queue.add(config)
    assert queue.entries() == []


@pytest.mark.parametrize("save", [True, False])
def test_stop_ends_the_job_saves_as_asked_and_can_pause_the_queue(make_queue, tiny_provider, images, tmp_path, save):
    queue = make_queue(RecordingProvider(tiny_provider))
    reached = threading.Event()
    queue.subscribe(lambda progress: progress.step >= 2 and reached.set())
    queue.add(job(images, "waiting"))
    queue.start(job(images, "long", iterations=2000))
    assert reached.wait(WAIT)
    assert queue.stop(save=save, pause_queue=True).startswith("Stopping 'long'")
    assert queue.wait_idle(WAIT)
    (entry,) = queue.status().results
    assert entry.state == "stopped" and entry.message.startswith("Stopped at step")
    saved = sorted(p.name for p in (tmp_path / "lora").glob("long*.safetensors"))
    assert (len(saved) == 1 and saved[0].startswith("long_") and saved[0].endswith("steps.safetensors")) if save else saved == []
    assert [(e.name, e.state) for e in queue.entries()] == [("waiting", "paused")]
    assert queue.stop(save=True) == "Nothing is training."


def test_stop_lets_the_queue_go_on_by_default_as_the_original(make_queue, tiny_provider, images):
    queue = make_queue(RecordingProvider(tiny_provider))
    reached = threading.Event()
    queue.subscribe(lambda progress: progress.step >= 2 and reached.set())
    queue.add(job(images, "next"))
    queue.start(job(images, "long", iterations=2000))
    assert reached.wait(WAIT)
    assert "run next" in queue.stop(save=False)
    assert queue.wait_idle(WAIT)
    states = {entry.name: entry.state for entry in queue.status().results}
    assert states == {"long": "stopped", "next": "done"} and queue.entries() == []


def test_stop_while_idle_changes_nothing(make_queue, tiny_provider, images):
    queue = make_queue(RecordingProvider(tiny_provider))
    assert queue.stop(save=False, pause_queue=True) == "Nothing is training."
    queue.add(job(images, "queued only"))
    assert [e.state for e in queue.entries()] == ["paused"], "Add to Queue still only queues"
    queue.start(job(images, "now", iterations=2))
    assert queue.wait_idle(WAIT)
