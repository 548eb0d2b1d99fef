"""`python -m traintrain bench`: time the real LoRA / iLECO mode on a random-weight model against a bare reference step.

The mode runs through `run_training` unchanged; it is timed from the loop's progress events, each of which follows a
loss read-back (a device sync): from the first event at or after the warm-up to the last step. The reference is the
same UNet with plain rank-r adapters on the same layers, fused AdamW and, on CUDA, the whole step as one CUDA graph.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch

from traintrain.bench.models import bench_bundle
from traintrain.bench.reference import time_reference
from traintrain.bench.settings import ADAPTERS, GIB, MODELS, MODES, RANK, BenchReport, BenchSettings, Measurement
from traintrain.bench.timing import PeakMemory, first_timed_step, time_mode
from traintrain.errors import TrainTrainError
from traintrain.precision import precision_dtype


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
    name = found.group(1).strip() if found else platform.processor() or platform.machine()
    return f"cpu ({name}, {torch.get_num_threads()} threads)"


def _mode_warmup(settings: BenchSettings, device: torch.device) -> str:
    start = first_timed_step(settings.warmup, device)
    return "" if start == settings.warmup else f" (the mode: {start}, its first progress event after them)"


def _line(what: str, m: Measurement) -> str:
    return (
        f"{what}: {m.steps_per_s:.3f} steps/s, {m.images_per_s:.3f} images/s, "
        f"peak {m.peak_bytes / GIB:.2f} GiB, last loss {m.loss:.4g} ({m.steps} steps in {m.seconds:.3f} s)"
    )


def _adapter_patches(adapter: str) -> contextlib.AbstractContextManager:
    """The WebUI's UNet hijacks for the LDM layout (timestep embeddings on the device, SDPA attention)."""
    if adapter != "ldm":
        return contextlib.nullcontext()
    from traintrain.bench.webui_layout import webui_unet_patches

    return webui_unet_patches()


def run_bench(settings: BenchSettings, out: Callable[[str], None] = print) -> BenchReport:
    """Build the model, time the mode and the reference, and print the report line by line through `out`."""
    from traintrain.models.open import default_device

    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = default_device()
    dtype = torch.float32 if device.type == "cpu" else precision_dtype(settings.precision)
    memory = PeakMemory(device)
    s = settings
    header = [
        f"TrainTrain bench: model {s.model} (random weights, {ADAPTERS[s.adapter]}), mode {MODES[s.mode]}, "
        f"rank {RANK}, UNet only",
        f"device: {_device_name(device)}, torch {torch.__version__}, dtype {str(dtype).removeprefix('torch.')}, "
        f"batch {s.batch}, resolution {s.side}, grad-ckpt {'on' if s.grad_ckpt else 'off'}",
        f"warm-up {s.warmup} steps{_mode_warmup(s, device)}, timed {s.steps} steps; memory: {memory.label}",
    ]
    for line in header:
        out(line)
    started = time.perf_counter()
    bundle = bench_bundle(s.model, device, dtype, s.adapter)
    out(f"model built in {time.perf_counter() - started:.1f} s")
    with _adapter_patches(s.adapter):
        mode = time_mode(bundle, s, memory)
        out(_line(f"mode ({MODES[s.mode]} via run_training, {mode.note})", mode))
        reference = time_reference(bundle, s, memory)
        out(_line(f"reference (bare step, {reference.note})", reference))
    report = BenchReport(s, _device_name(device), dtype, mode, reference)
    out(f"ratio: {report.ratio:.2f} (mode / reference)")
    return report


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `bench` command's options."""
    parser.add_argument("--model", choices=list(MODELS), default="tiny", help="tiny, or random-weight SD1.5 / SDXL")
    parser.add_argument("--mode", choices=list(MODES), default="lora")
    parser.add_argument(
        "--adapter", choices=list(ADAPTERS), default="diffusers", help="ldm: SD1.5 in the WebUI's model layout"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: 64 tiny, 512 sd1, 1024 sdxl)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA graphs: the mode's use_cuda_graph setting and the reference step as one graph (CUDA)",
    )
    parser.add_argument("--compile", action="store_true", help="the mode's use_torch_compile setting")
    parser.add_argument(
        "--precision", choices=["bf16", "fp16"], default="bf16", help="GPU: frozen weights and autocast (fp16: grad scaler)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 gives steadier CPU figures")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """BenchSettings from parsed `bench` options (the option names are the field names)."""
    return BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)})


def main(argv: list[str] | None = None) -> int:
    """`python -m traintrain.bench …` (the same as `python -m traintrain bench …`)."""
    args = add_bench_arguments(argparse.ArgumentParser(prog="python -m traintrain bench")).parse_args(argv)
    try:
        run_bench(settings_from_args(args))
    except TrainTrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

