"""Timing the real mode: peak memory, the progress-event clock, the mode's settings and its timed run."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from traintrain.bench.settings import ALPHA, LEARNING_RATE, MODES, PROMPTS, RANK, BenchSettings, Measurement
from traintrain.errors import TrainTrainError
from traintrain.progress import Progress

if TYPE_CHECKING:  # diffusers and the modes are imported when a bench runs, not to parse the command line
    from traintrain.config import TrainConfig
    from traintrain.models.bundle import ModelBundle



class PeakMemory:
    """Peak memory since `reset`: CUDA allocated bytes on a GPU; on the CPU the process's peak resident set size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "peak GPU memory (torch.cuda.max_memory_allocated)"
        since = "" if self.resettable else " since the process started"
        return f"peak RSS{since} (CPU run: resident set size of the process, not GPU memory)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS
            except OSError:
                self.resettable = False

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status")
        found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
        if found:
            return int(found.group(1)) * 1024
        try:
            import resource
        except ImportError:  # Windows: no peak RSS without psutil
            return 0
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def graph_pool_bytes(device: torch.device) -> int:
    """GPU memory held by CUDA graph pools (a replay allocates nothing new, so a peak counted after the capture
    misses the activations living there); 0 on the CPU."""
    if device.type != "cuda":
        return 0
    segments = torch.cuda.memory_snapshot()
    return sum(seg["total_size"] for seg in segments if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


class StepNotes(logging.Handler):
    """Collects how the loop ran the steps (CUDA graphs captured or why not) from the trainer's log, for the report."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.captured = 0
        self.eager: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("CUDA graph captured"):
            self.captured += 1
        elif "CUDA graph" in message:
            self.eager.append(message)

    @contextlib.contextmanager
    def listening(self) -> Iterator["StepNotes"]:
        """Attached (at INFO) to the loggers that say how steps run, while inside."""
        loggers = [logging.getLogger(name) for name in ("traintrain.cuda_graphs", "traintrain.loop")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(self)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        try:
            yield self
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(self)
                logger.setLevel(level)

    def summary(self, device: torch.device, compiled: bool) -> str:
        """E.g. "CUDA graphs (1 captured)", "eager: <why>"."""
        how = "compiled, " if compiled else ""
        if self.captured:
            return f"{how}CUDA graphs ({self.captured} captured)" + (f"; {'; '.join(self.eager)}" if self.eager else "")
        if device.type != "cuda":
            return f"{how}eager"
        return f"{how}eager" + (f": {'; '.join(self.eager)}" if self.eager else "")


def sync_device(device: torch.device) -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Progress callback timing the loop: a timestamp per event from step `start` on (each event follows a loss
    read-back, so the device has finished those steps); memory peaks are counted from `start`, plus what CUDA graph
    pools hold (captured before `start`)."""

    def __init__(self, device: torch.device, start: int, memory: PeakMemory) -> None:
        self.device, self.start, self.memory = device, start, memory
        self.events: list[tuple[int, float, float]] = []  # (step, seconds, loss)
        self.peak = 0

    def __call__(self, progress: Progress) -> None:
        sync_device(self.device)
        now = time.perf_counter()
        if progress.step < self.start:
            return
        if not self.events:
            self.memory.reset()
        self.events.append((progress.step, now, progress.loss))
        self.peak = self.memory.peak()

    def measurement(self, batch: int) -> Measurement:
        if len(self.events) < 2:
            raise TrainTrainError("The mode sent too few progress events to time it: raise --steps.")
        (first, begin, _), (last, end, loss) = self.events[0], self.events[-1]
        peak = self.peak + graph_pool_bytes(self.device)
        return Measurement(last - first, end - begin, batch, peak, loss)


def bench_config(settings: BenchSettings, data_dir: Path | None, iterations: int, device: torch.device) -> TrainConfig:
    """The mode's settings: UNet-only rank-16 LierLa, constant lr, bf16 (or fp16) model on a GPU, fp32 LoRA, no CSV or
    saves."""
    from traintrain.config import TrainConfig
    from traintrain.config_fields import BLOCKS_SD
    from traintrain.models.targets import TEXT_BLOCK

    side = settings.side
    return TrainConfig(
        mode=MODES[settings.mode],
        lora_data_directory=str(data_dir or ""),
        original_prompt=PROMPTS[0],
        target_prompt=PROMPTS[1],
        image_size=(side, side),
        image_buckets_step=64,
        image_min_length=side,
        network_rank=RANK,
        network_alpha=ALPHA,
        network_blocks=[block for block in BLOCKS_SD if block != TEXT_BLOCK],
        train_iterations=iterations,
        train_batch_size=settings.batch,
        train_learning_rate=LEARNING_RATE,
        train_lr_scheduler="constant",
        train_seed=0,
        use_gradient_checkpointing=settings.grad_ckpt,
        use_cuda_graph=settings.graph,
        use_torch_compile=settings.compile,
        train_model_precision="fp32" if device.type == "cpu" else settings.precision,
        train_lora_precision="fp32",
        save_lora_name="bench",
        save_overwrite=True,
        logging_save_csv=False,
    )


def first_timed_step(warmup: int, device: torch.device) -> int:
    """The mode's timing starts at the first progress event at or after `warmup` steps: events follow the loss
    read-backs, every step on the CPU and every 10 on a GPU."""
    from traintrain.loop import readback_interval

    every = readback_interval(device)
    return math.ceil(warmup / every) * every


def time_mode(bundle: ModelBundle, settings: BenchSettings, memory: PeakMemory) -> Measurement:
    """Run the real mode for (warm-up rounded up to a progress event) + steps iterations and time the steps after the
    warm-up from the progress events; peak memory counts from the end of the warm-up."""
    from traintrain.demo import write_sample_images
    from traintrain.modes import OutputDirs, RunContext, run_training

    start = first_timed_step(settings.warmup, bundle.device)
    with tempfile.TemporaryDirectory(prefix="traintrain-bench-") as tmp:
        root = Path(tmp)
        images = write_sample_images(root / "images", size=settings.side) if settings.mode == "lora" else None
        config = bench_config(settings, images, start + settings.steps, bundle.device)
        clock = StepClock(bundle.device, start, memory)
        dirs = OutputDirs(lora=root / "Lora", logs=root / "logs", jsons=root / "jsons")
        with StepNotes().listening() as notes:
            run_training(RunContext(config, bundle, dirs, progress=clock))
    measurement = clock.measurement(settings.batch)
    measurement.note = notes.summary(bundle.device, settings.compile)
    return measurement
