"""The bench's settings, measurements and report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelKind

if TYPE_CHECKING:  # diffusers and the modes are imported when a bench runs, not to parse the command line
    pass

MODELS: dict[str, ModelKind] = {"tiny": "sd1", "sd1": "sd1", "sdxl": "sdxl"}
MODES = {"lora": "LoRA", "ileco": "iLECO"}
ADAPTERS = {"diffusers": "diffusers", "ldm": "WebUI LDM layout"}
DEFAULT_RESOLUTION = {"tiny": 64, "sd1": 512, "sdxl": 1024}
RANK, ALPHA, LEARNING_RATE = 16, 8.0, 1e-4
PROMPTS = ("a photo of a cat", "a photo of a dog")  # iLECO's original / target; the reference's conditioning
GIB = 2**30


@dataclass
class BenchSettings:
    """What to time: model, mode, batch, image side, gradient checkpointing, timed and warm-up steps."""

    model: str = "tiny"
    mode: str = "lora"
    adapter: str = "diffusers"  # the model adapter: diffusers, or ldm (the WebUI's model layout, SD1.5 only)
    batch: int = 1
    resolution: int | None = None  # None: 64 tiny, 512 sd1, 1024 sdxl
    grad_ckpt: bool = False
    steps: int = 20
    warmup: int = 3
    graph: bool = True  # CUDA graphs: the mode's `use_cuda_graph`, the reference captured as one graph (CUDA only)
    compile: bool = False  # the mode's `use_torch_compile`
    precision: str = "bf16"  # GPU: frozen weights and autocast, the mode's `train_model_precision` (CPU: fp32)
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: torch's default

    @property
    def side(self) -> int:
        """The image side in pixels."""
        return self.resolution or DEFAULT_RESOLUTION[self.model]

    def check(self) -> None:
        """Refuse settings the bench cannot run, saying what to change."""
        if self.model not in MODELS or self.mode not in MODES or self.adapter not in ADAPTERS:
            raise TrainTrainError(
                f"Choose --model from {', '.join(MODELS)}, --mode from {', '.join(MODES)} and --adapter from "
                f"{', '.join(ADAPTERS)}."
            )
        if self.precision not in ("bf16", "fp16"):
            raise TrainTrainError(f"--precision is bf16 or fp16, not {self.precision}.")
        if self.adapter == "ldm" and self.model != "sd1":
            raise TrainTrainError("--adapter ldm builds SD1.5 in the WebUI's layout: use it with --model sd1.")
        if self.batch < 1 or self.steps < 1 or self.warmup < 1 or (self.threads or 1) < 1:
            raise TrainTrainError("--batch, --steps, --warmup and --threads must be at least 1.")
        if self.side < 64 or self.side % 64:
            raise TrainTrainError(f"--resolution must be a multiple of 64, at least 64, not {self.side}.")


@dataclass
class Measurement:
    """Timed steps of one contender, its peak memory and its last loss."""

    steps: int
    seconds: float
    batch: int
    peak_bytes: int
    loss: float
    note: str = ""

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.batch


@dataclass
class BenchReport:
    """Both measurements and the context they were taken in."""

    settings: BenchSettings
    device: str
    dtype: torch.dtype
    mode: Measurement
    reference: Measurement

    @property
    def ratio(self) -> float:
        """Mode steps/s over reference steps/s."""
        return self.mode.steps_per_s / self.reference.steps_per_s
