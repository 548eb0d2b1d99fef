"""The training queue: one worker thread runs jobs FIFO; add, start, stop, remove, status and progress events."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import torch
from PIL import Image

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.files import atomic_write_text, read_json, remove_stale_temp_files
from traintrain.models.bundle import ModelBundle
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.preflight import check_before_model
from traintrain.previews import PREVIEW_BUSY, PreviewRequest
from traintrain.progress import Progress, ProgressCallback, StopFlag, console_progress

log = logging.getLogger(__name__)

OOM_MESSAGE = "Out of memory: try gradient checkpointing, a smaller batch or rank."
HISTORY = 50  # finished jobs kept in status().results


class ModelProvider(Protocol):
    """Opens the model a job trains on; the WebUI's adapter also takes the WebUI's generation lock inside `open`.

    A provider whose Model and VAE settings are paths sets `model_files = True`: they are checked before queueing."""

    def open(self, config: TrainConfig) -> ContextManager[ModelBundle]:
        """The model for `config`, ready until the context ends."""
        ...

    def preview(self, config: TrainConfig, requests: list[PreviewRequest]) -> list[Image.Image]:
        """iLECO previews: the images `requests` ask for; refused while a training (or, in the WebUI, a generation)
        holds the model."""
        ...


class OpenModelProvider:
    """Standalone provider: `open_model` on the config's model (or `default_model`), reused while the choice stays."""

    model_files = True  # the Model and VAE boxes hold paths, checked before a job is queued

    def __init__(self, default_model: str = "tiny") -> None:
        self.default_model = default_model
        self._key: tuple | None = None
        self._bundle: ModelBundle | None = None
        self._in_use = threading.Lock()  # a job or a preview

    @contextlib.contextmanager
    def open(self, config: TrainConfig) -> Iterator[ModelBundle]:
        """Open (or reuse) the bundle for the config's model, VAE, v-prediction and precision."""
        with self._in_use:
            yield self._bundle_for(config)

    def preview(self, config: TrainConfig, requests: list[PreviewRequest]) -> list[Image.Image]:
        """Draw the previews with the config's model (refused while a job trains it)."""
        from traintrain.previews import draw

        if not self._in_use.acquire(blocking=False):
            raise TrainTrainError(PREVIEW_BUSY)
        try:
            bundle = self._bundle_for(config)
            return [draw(bundle, request) for request in requests]
        finally:
            self._in_use.release()

    def _bundle_for(self, config: TrainConfig) -> ModelBundle:
        from traintrain.models.open import open_model

        model = config.model or self.default_model
        key = (model, config.vae, config.model_v_pred, config.train_model_precision)
        if key != self._key or self._bundle is None:
            self._bundle = None  # let the previous model go before loading the next one
            self._bundle = open_model(
                model, vae=config.vae, v_pred=config.model_v_pred, precision=config.train_model_precision
            )
            self._key = key
        return self._bundle


@dataclass(frozen=True)
class JobEntry:
    """A row of the queue: the job's save name, mode, state (queued, running, done, stopped, failed) and main
    settings (model, rank, steps, learning rate; "1st / 2nd" pass values where Difference's 2nd pass differs)."""

    name: str
    mode: str
    state: str
    message: str = ""
    model: str = ""
    rank: str = ""
    steps: str = ""
    lr: str = ""

    @classmethod
    def of(cls, config: TrainConfig, state: str, message: str = "") -> JobEntry:
        """The row of `config` in `state`."""
        second = config.second_pass if config.use_2nd_pass_settings else None

        def both(name: str) -> str:
            first = f"{getattr(config, name):g}"
            other = f"{getattr(second, name):g}" if second is not None else first
            return first if other == first else f"{first} / {other}"

        return cls(
            config.effective_name, config.mode, state, message,
            model=config.model or "(default)", rank=both("network_rank"),
            steps=both("train_iterations"), lr=both("train_learning_rate"),
        )  # fmt: skip


@dataclass(frozen=True)
class QueueStatus:
    """A snapshot for the UI: what runs now, its last progress, the last message and the finished jobs."""

    running: bool
    current: str | None
    progress: Progress | None
    message: str
    queued: int
    paused: bool
    results: tuple[JobEntry, ...]

    @property
    def state(self) -> str:
        """'running' or 'idle'."""
        return "running" if self.running else "idle"


class JobQueue:
    """FIFO jobs run by one worker thread; the queue is saved to `queue_file` and comes back paused after a restart."""

    def __init__(self, provider: ModelProvider, dirs: OutputDirs, queue_file: Path, *, console: bool = True) -> None:
        """`console`: also draw each job's progress as a tqdm line on the console (what WebUI users watch)."""
        self.provider = provider
        self.console = console
        self.dirs = dirs
        self.queue_file = Path(queue_file)
        self._lock = threading.Condition()
        self._pending: deque[TrainConfig] = deque()
        self._current: TrainConfig | None = None
        self._progress: Progress | None = None
        self._message = ""
        self._results: deque[JobEntry] = deque(maxlen=HISTORY)
        self._paused = True
        self._closed = False
        self._stop = StopFlag()
        self._subscribers: list[ProgressCallback] = []
        self._load()
        self._worker = threading.Thread(target=self._work, name="traintrain-worker", daemon=True)
        self._worker.start()

    # ----- actions (called from UI handlers; none of them waits for a training)

    def add(self, config: TrainConfig) -> str:
        """Queue a job after the others; refuses a save name already queued or running."""
        with self._lock:
            name = self._admit(config)
            self._pending.append(config)
            self._changed()
        return f"Added {name!r} to the queue ({len(self._pending)} waiting)."

    def start(self, config: TrainConfig) -> str:
        """Run `config` now; jobs queued earlier run after it, then anything added meanwhile."""
        with self._lock:
            if self._current is not None or not self._paused:
                running = repr(self._current.effective_name) if self._current else "The queue"
                raise TrainTrainError(f"{running} is training now: press Stop first, or use Add to Queue.")
            name = self._admit(config)
            self._pending.appendleft(config)
            self._paused = False
            self._changed()
        return f"Started {name!r}."

    def run_queue(self) -> str:
        """Resume the queued jobs (after a restart, a stop or when they were only added)."""
        with self._lock:
            if not self._pending:
                raise TrainTrainError("The queue is empty: add jobs with Add to Queue first.")
            self._paused = False
            self._changed()
            return f"Running the queue ({len(self._pending)} job(s))."

    def stop(self, save: bool | None = None, pause_queue: bool = False) -> str:
        """Stop the running job after its current step; the queued jobs go on (as in the original) unless
        `pause_queue`. `save` None follows the job's 'save on stop'."""
        with self._lock:
            if self._current is None:
                return "Nothing is training."
            self._paused = pause_queue
            self._changed()
            save = self._current.save_on_stop if save is None else save
            self._stop.request(save=save)
            name, waiting = self._current.effective_name, len(self._pending)
        after = f" {waiting} queued job(s) " + ("wait for Run queue." if pause_queue else "run next.") if waiting else ""
        return f"Stopping {name!r}" + (" and saving what it has learned." if save else " without saving.") + after

    def remove(self, name: str) -> str:
        """Take the queued job `name` out of the queue."""
        name = name.strip()
        with self._lock:
            if self._current is not None and self._current.effective_name == name:
                raise TrainTrainError(f"{name!r} is training now: use Stop to end it.")
            for config in self._pending:
                if config.effective_name == name:
                    self._pending.remove(config)
                    self._changed()
                    return f"Removed {name!r} from the queue."
        raise TrainTrainError(f"No queued job is named {name!r}: copy the name from the queue list.")

    # ----- views

    def entries(self) -> list[JobEntry]:
        """The running job, then the queued ones in the order they will run."""
        with self._lock:
            rows = [JobEntry.of(self._current, "running")] if self._current else []
            state = "paused" if self._paused else "queued"
            return rows + [JobEntry.of(c, state) for c in self._pending]

    def status(self) -> QueueStatus:
        """A consistent snapshot for the status line."""
        with self._lock:
            current = self._current.effective_name if self._current else None
            return QueueStatus(
                running=current is not None,
                current=current,
                progress=self._progress,
                message=self._message,
                queued=len(self._pending),
                paused=self._paused,
                results=tuple(self._results),
            )

    def subscribe(self, callback: ProgressCallback) -> Callable[[], None]:
        """Call `callback` with every progress event (from the worker thread); returns the unsubscribe function."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing runs and nothing will start on its own; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._current is None and (self._paused or not self._pending), timeout)

    def close(self, timeout: float | None = None) -> None:
        """End the worker thread (a running job stops as its 'save on stop' says); the queue file stays."""
        with self._lock:
            self._closed = True
            if self._current is not None:
                self._stop.request(save=self._current.save_on_stop)
            self._lock.notify_all()
        self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    # ----- internals (called with the lock held unless said otherwise)

    def _admit(self, config: TrainConfig) -> str:
        check_before_model(config, model_files=getattr(self.provider, "model_files", False))
        name = config.effective_name
        busy = [c.effective_name for c in self._pending] + ([self._current.effective_name] if self._current else [])
        if name in busy:
            raise TrainTrainError(
                f"Duplicated LoRA name {name!r}: it is already queued or running. Change 'save lora name'."
            )
        return name

    def _changed(self) -> None:
        self._save()
        self._lock.notify_all()

    def _save(self) -> None:
        """Write the queue file; a failure is logged and shown, the queue in memory goes on."""
        jobs = ([self._current] if self._current else []) + list(self._pending)
        try:
            atomic_write_text(self.queue_file, json.dumps({"jobs": [c.to_json_dict() for c in jobs]}, indent=1))
        except TrainTrainError as error:
            log.error("%s", error)
            self._message = f"The queue is not saved: {error}"

    def _load(self) -> None:
        """Read the saved queue; a file that cannot be read is renamed aside (kept for the user) and the queue starts
        empty, so a broken queue file never stops the UI from starting."""
        remove_stale_temp_files(self.queue_file.parent)
        if not self.queue_file.exists():
            return
        try:
            data = read_json(self.queue_file, "saved queue")
            jobs = data.get("jobs") if isinstance(data, dict) else None
            if not isinstance(jobs, list):
                raise TrainTrainError(f"The saved queue {self.queue_file} holds no list of jobs.")
            configs = [TrainConfig.from_json_dict(job) for job in jobs]
        except TrainTrainError as error:
            self._message = f"Could not read the saved queue ({error}); the queue starts empty. {self._keep_aside()}"
            log.warning("%s", self._message)
            return
        self._pending.extend(configs)
        if self._pending:
            self._message = f"{len(self._pending)} job(s) from the last session wait in the queue: press Run queue."

    def _keep_aside(self) -> str:
        """Rename the unreadable queue file to `<name>.bad-<time>` and say where it went."""
        aside = self.queue_file.with_name(f"{self.queue_file.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.replace(self.queue_file, aside)
        except OSError as error:
            return f"It could not be renamed aside ({error.strerror or error})."
        return f"The file is kept as {aside}."

    def _work(self) -> None:
        """The worker thread: waits (holding nothing) until a job may run, runs it, records the outcome."""
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or (self._pending and not self._paused))
                if self._closed:
                    return
                config = self._current = self._pending.popleft()
                self._progress = None
                self._message = ""  # the status line says "loading the model…" until the first step
                self._stop.clear()
                self._changed()
            entry = self._run(config)
            with self._lock:
                self._current = None
                self._results.appendleft(entry)
                self._message = entry.message
                if not self._pending:
                    self._paused = True
                self._changed()

    def _run(self, config: TrainConfig) -> JobEntry:
        """Run one job outside the lock; every failure becomes a recorded message."""
        name = config.effective_name
        try:
            with self.provider.open(config) as bundle:
                if self._stop.requested:
                    return JobEntry.of(config, "stopped", f"{name}: stopped before training began.")
                progress = _both(self._publish, console_progress()) if self.console else self._publish
                result = run_training(RunContext(config, bundle, self.dirs, progress=progress, stop=self._stop))
        except TrainTrainError as error:
            return JobEntry.of(config, "failed", f"{name}: {error}")
        except Exception as error:  # noqa: BLE001 - any failure ends this job only; the worker goes on
            log.exception("Training %r failed", name)
            return JobEntry.of(config, "failed", f"{name}: {_describe_failure(error)}")
        return JobEntry.of(config, "stopped" if result.stopped else "done", result.message)

    def _publish(self, progress: Progress) -> None:
        with self._lock:
            self._progress = progress
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(progress)
            except Exception:  # noqa: BLE001 - a broken listener must not end the training
                log.exception("A progress listener failed")


def _both(first: ProgressCallback, second: ProgressCallback) -> ProgressCallback:
    """One callback calling two."""

    def call(progress: Progress) -> None:
        first(progress)
        second(progress)

    return call


def _describe_failure(error: Exception) -> str:
    """A one-line message; out-of-memory errors get the advice of what to change."""
    text = str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return OOM_MESSAGE
    return f"Error: {type(error).__name__}: {text}"


_shared: dict[Path, JobQueue] = {}
_shared_lock = threading.Lock()


def shared_queue(provider: ModelProvider, dirs: OutputDirs, queue_file: Path) -> JobQueue:
    """The process-wide queue of `queue_file`: a UI reload gets the same queue (and running job) back."""
    key = Path(queue_file).resolve()
    with _shared_lock:
        queue = _shared.get(key)
        if queue is None or queue.closed:
            queue = _shared[key] = JobQueue(provider, dirs, key)
        queue.provider, queue.dirs = provider, dirs
        return queue
