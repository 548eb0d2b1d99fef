"""Timing the real mode: peak memory, the progress-event clock, the mode's settings and its timed run."""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainer.bench.settings import ALPHA, LEARNING_RATE, MODES, PROMPTS, RANK, BenchSettings, Measurement
from trainer.errors import TrainTrainError
from trainer.progress import Progress

if TYPE_CHECKING:  # diffusers and the modes are imported when a bench runs, not to parse the command line
    from trainer.config import TrainConfig
    from trainer.models.diffusers_backend import DiffusersBundle



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


def sync_device(device: torch.device) -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Progress callback timing the loop: a timestamp per event from step `start` on (each event follows a loss
    read-back, so the device has finished those steps); memory peaks are counted from `start`."""

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
        return Measurement(last - first, end - begin, batch, self.peak, loss)


def bench_config(settings: BenchSettings, data_dir: Path | None, iterations: int, device: torch.device) -> TrainConfig:
    """The mode's settings: UNet-only rank-16 LierLa, constant lr, bf16 model on a GPU, fp32 LoRA, no CSV or saves."""
    from trainer.config import TrainConfig
    from trainer.config_fields import BLOCKS_SD
    from trainer.models.targets import TEXT_BLOCK

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
        train_model_precision="fp32" if device.type == "cpu" else "bf16",
        train_lora_precision="fp32",
        save_lora_name="bench",
        save_overwrite=True,
        logging_save_csv=False,
    )


def first_timed_step(warmup: int, device: torch.device) -> int:
    """The mode's timing starts at the first progress event at or after `warmup` steps: events follow the loss
    read-backs, every step on the CPU and every 10 on a GPU."""
    from trainer.loop import readback_interval

    every = readback_interval(device)
    return math.ceil(warmup / every) * every


def time_mode(bundle: DiffusersBundle, settings: BenchSettings, memory: PeakMemory) -> Measurement:
    """Run the real mode for (warm-up rounded up to a progress event) + steps iterations and time the steps after the
    warm-up from the progress events; peak memory counts from the end of the warm-up."""
    from trainer.demo import write_sample_images
    from trainer.modes import OutputDirs, RunContext, run_training

    start = first_timed_step(settings.warmup, bundle.device)
    with tempfile.TemporaryDirectory(prefix="traintrain-bench-") as tmp:
        root = Path(tmp)
        images = write_sample_images(root / "images", size=settings.side) if settings.mode == "lora" else None
        config = bench_config(settings, images, start + settings.steps, bundle.device)
        clock = StepClock(bundle.device, start, memory)
        dirs = OutputDirs(lora=root / "Lora", logs=root / "logs", jsons=root / "jsons")
        run_training(RunContext(config, bundle, dirs, progress=clock))
    return clock.measurement(settings.batch)
