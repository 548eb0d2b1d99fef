"""What every mode shares: the run context, network building, loop settings, seeds, saving and logging."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import torch

from traintrain.config import TrainConfig
from traintrain.csvlog import CsvLog
from traintrain.diffusion import NoiseSchedule, weighted_loss
from traintrain.files import free_path, inside, output_path
from traintrain.loop import LoopResult, LoopSettings, run_loop
from traintrain.models.int8 import INT8, require_int8
from traintrain.models.bundle import BASE_MODEL_VERSION, Conditioning, ModelBundle
from traintrain.networks.kohya_io import network_from_file, save_network
from traintrain.networks.kohya_io import training_metadata
from traintrain.modes.metadata import kohya_settings
from traintrain.models.targets import TEXT_BLOCK
from traintrain.networks.network import Network, NetworkSpec
from traintrain.precision import autocast_dtype, precision_dtype, weight_dtype
from traintrain.progress import ProgressCallback, StopFlag
from traintrain.step import StepInputs, TrainingStep, tensors_without_none

log = logging.getLogger(__name__)


@dataclass
class OutputDirs:
    """Where a run writes: LoRA files, CSV logs and settings JSON."""

    lora: Path
    logs: Path
    jsons: Path


@dataclass
class RunContext:
    """One training job: its settings, the model, where to write, and the progress / stop channels."""

    config: TrainConfig
    bundle: ModelBundle
    dirs: OutputDirs
    progress: ProgressCallback | None = None
    stop: StopFlag = field(default_factory=StopFlag)
    started_at: float = field(default_factory=time.time)
    stamp: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d_%H%M%S"))


@dataclass
class TrainResult:
    """What a job produced."""

    path: Path | None  # the final LoRA (None when nothing was saved)
    steps: int
    losses: list[float]
    stopped: bool = False
    extra_files: list[Path] = field(default_factory=list)
    message: str = ""

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def network_spec(config: TrainConfig, *, text_encoder: bool) -> NetworkSpec:
    """The network spec of a pass; BASE (the text encoders) only when the mode trains them."""
    blocks = [b for b in config.network_blocks if text_encoder or b != TEXT_BLOCK]
    return NetworkSpec(
        network_type=config.network_type,
        rank=config.network_rank,
        alpha=config.network_alpha,
        conv_rank=config.network_conv_rank,
        conv_alpha=config.network_conv_alpha,
        element=config.network_element,
        blocks=blocks,
    )


def lora_dtype(config: TrainConfig) -> torch.dtype:
    """dtype of the trained adapter weights."""
    return precision_dtype(config.train_lora_precision)


def build_network(ctx: RunContext, config: TrainConfig, *, text_encoder: bool, resume: bool = True) -> Network:
    """Create the pass's network (or, with `resume`, continue the one in `network_resume`), on the model's device."""
    targets = ctx.bundle.lora_targets()
    if resume and config.network_resume:
        network = network_from_file(Path(config.network_resume), targets, text_encoder=text_encoder)
    else:
        network = Network.build(network_spec(config, text_encoder=text_encoder), targets)
    if config.logging_verbose:
        log.info("Network: %d modules (%s)", len(network.adapters), ", ".join(list(network.adapters)[:5]) + ", …")
    return network.to_device(ctx.bundle.device, lora_dtype(config))


def load_network_file(ctx: RunContext, config: TrainConfig, path: Path) -> Network:
    """A network with exactly the modules and weights of a saved file (e.g. a Difference copy machine)."""
    return network_from_file(path, ctx.bundle.lora_targets()).to_device(ctx.bundle.device, lora_dtype(config))


def loop_settings(config: TrainConfig, device: torch.device) -> LoopSettings:
    """The loop's view of a pass's settings."""
    return LoopSettings(
        iterations=config.train_iterations,
        learning_rate=config.train_learning_rate,
        text_encoder_lr=config.train_textencoder_learning_rate,
        optimizer=config.train_optimizer,
        optimizer_settings=config.train_optimizer_settings,
        scheduler=config.train_lr_scheduler,
        scheduler_settings=config.train_lr_scheduler_settings,
        warmup_steps=config.train_lr_warmup_steps,
        num_cycles=config.train_lr_scheduler_num_cycles,
        power=config.train_lr_scheduler_power,
        step_rules=config.train_lr_step_rules,
        save_every=config.save_per_steps,
        autocast_dtype=autocast_dtype(config.train_model_precision, device),
        cuda_graph=config.use_cuda_graph,
        compile=config.use_torch_compile,
    )


# A batch source for the denoising objective: step index -> (latents, conditioning or, when the text encoder is
# trained, the captions' token tensors, mask or None, SDXL size ids (B,6) or None).
BatchDraw = Callable[
    [int], tuple[torch.Tensor, "Conditioning | dict[str, torch.Tensor]", "torch.Tensor | None", "torch.Tensor | None"]
]
TOKENS = "tokens_"  # prefix of token tensors among a step's inputs


class Objective:
    """A pass's timestep sampling and weighted loss, from its settings and the model's noise schedule."""

    def __init__(self, bundle: ModelBundle, config: TrainConfig) -> None:
        self.schedule = NoiseSchedule(bundle.alphas_cumprod, bundle.prediction)
        self.config = config

    def timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps in [min, max) timesteps, shared by the batch when `train fixed timesteps in batch`."""
        c = self.config
        return self.schedule.sample_timesteps(
            batch, c.train_min_timesteps, c.train_max_timesteps, generator, shared=c.train_fixed_timsteps_in_batch
        )

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A denoising step's draws for `latents`: the noise and the timesteps (with the latents themselves)."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        return {"latents": latents, "noise": noise, "timesteps": self.timesteps(latents.shape[0], generator)}

    def denoising_loss(self, bundle: ModelBundle, inputs: StepInputs, cond: Conditioning) -> torch.Tensor:
        """The standard objective on `noised` inputs: predict the noise (or velocity) of the noised latents."""
        latents, noise, timesteps = inputs["latents"], inputs["noise"], inputs["timesteps"]
        noisy = self.schedule.add_noise(latents, noise, timesteps)
        prediction = bundle.predict(noisy, timesteps, cond, inputs.get("sizes"))
        return self.loss(prediction, self.schedule.target(latents, noise, timesteps), timesteps, inputs.get("mask"))

    def denoising_step(self, bundle: ModelBundle, draw: BatchDraw, generator: torch.Generator) -> TrainingStep:
        """A step of the standard objective on the batches `draw` gives: (latents, conditioning or, when the text
        encoder is trained, the captions' token tensors to encode inside the loss, mask or None, sizes or None)."""

        def inputs(index: int) -> StepInputs:
            latents, cond, mask, sizes = draw(index)
            tensors = tensors_without_none(**self.noised(latents, generator), mask=mask, sizes=sizes)
            if isinstance(cond, Conditioning):
                return StepInputs({**tensors, **cond.tensors("cond")})
            return StepInputs({**tensors, **{TOKENS + name: t for name, t in cond.items()}})

        def loss(inputs: StepInputs) -> torch.Tensor:
            tokens = {k.removeprefix(TOKENS): t for k, t in inputs.tensors.items() if k.startswith(TOKENS)}
            cond = bundle.encode_tokens(tokens) if tokens else Conditioning.from_tensors(inputs.tensors, "cond")
            return self.denoising_loss(bundle, inputs, cond)

        return TrainingStep(inputs, loss)

    def loss(
        self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The configured loss function, min-SNR weighted when `train snr gamma` > 0."""
        c = self.config
        return weighted_loss(
            self.schedule, prediction, target, timesteps, kind=c.train_loss_function, snr_gamma=c.train_snr_gamma, mask=mask
        )


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """Seed torch (adapter init) and return a generator for noise / timesteps / batches."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class LoraWriter:
    """Writes a pass's LoRA files into the Lora folder: final, periodic and stop saves, with metadata."""

    def __init__(
        self, ctx: RunContext, config: TrainConfig, network: Network, stem: str, tags: dict[str, int], images: int = 0
    ) -> None:
        self.ctx, self.config, self.network, self.stem, self.tags = ctx, config, network, stem, tags
        self.images = images  # training images (pairs) for the metadata
        self.saved: list[Path] = []

    def save(self, suffix: str, steps: int) -> Path:
        """Save as `<stem><suffix>.safetensors` (atomic); weights that became NaN / inf are refused, never written.

        With overwrite off an existing file is never replaced: the save takes the next free numbered name instead
        (the final name was already refused up front; a file that appeared since must not cost the training)."""
        folder, stem = self.ctx.dirs.lora, self.stem + suffix
        if self.config.save_overwrite:
            path = output_path(folder, stem, ".safetensors", overwrite=True)
        else:
            path = free_path(folder, stem, ".safetensors")
        c, spec = self.config, self.network.spec
        metadata = training_metadata(
            output_name=path.stem,
            network_type=spec.network_type,
            rank=spec.rank,
            alpha=spec.alpha,
            conv_rank=spec.conv_rank,
            conv_alpha=spec.conv_alpha,
            base_model_version=BASE_MODEL_VERSION[self.ctx.bundle.kind],
            v_prediction=self.ctx.bundle.prediction == "v",
            settings=kohya_settings(c, images=self.images, steps=steps),
            tag_frequency=self.tags,
            started_at=self.ctx.started_at,
            steps=steps,
        )
        save_network(path, self.network, metadata, precision_dtype(c.save_precision), c.network_strength, steps)
        self.saved.append(path)
        log.info("Saved %s", path)
        return path


def open_csv_log(ctx: RunContext, config: TrainConfig, stem: str, lr_columns: int) -> CsvLog | None:
    """The pass's CSV log `logs/<date>/<stem>-<date_time>.csv` (the original's place), when `logging_save_csv` is on."""
    if not config.logging_save_csv:
        return None
    header = {
        "network_rank": config.network_rank,
        "network_alpha": config.network_alpha,
        "train_learning_rate": config.train_learning_rate,
        "train_iterations": config.train_iterations,
        "train_lr_scheduler": config.train_lr_scheduler,
        "model_version": BASE_MODEL_VERSION[ctx.bundle.kind],
        "train_optimizer": config.train_optimizer,
        "save_lora_name": stem,
    }
    day = ctx.stamp.split("_")[0]
    return CsvLog(inside(ctx.dirs.logs, f"{day}/{stem}-{ctx.stamp}.csv"), header, lr_columns)


def train_network(
    ctx: RunContext,
    config: TrainConfig,
    network: Network,
    step: TrainingStep,
    *,
    stem: str,
    tags: dict[str, int] | None = None,
    images: int = 1,
    phase: str = "",
    save_final: bool = True,
) -> TrainResult:
    """Hook `network` on, run the loop with `step`, and save `<stem>.safetensors` (periodic and stop saves too);
    `images` is the number of training images (pairs; 0 for prompts only), for the metadata."""
    writer = LoraWriter(ctx, config, network, stem, tags or {}, images)
    with network.applied():
        csv_log = open_csv_log(ctx, config, stem, len(network.param_groups(1.0)))
        result = run_loop(
            loop_settings(config, ctx.bundle.device),
            network,
            step,
            save=writer.save,
            csv_log=csv_log,
            progress=ctx.progress,
            stop=ctx.stop,
            phase=phase,
        )
    return finish(ctx, writer, result, save_final=save_final)


@contextlib.contextmanager
def prepared_model(ctx: RunContext, config: TrainConfig) -> Iterator[ModelBundle]:
    """The model ready for training (frozen, on its device, gradient checkpointing as configured), restored after.

    The global RNG is seeded first, so VAE encodings (which sample the posterior) are reproducible too. The VAE
    encodes in `train VAE precision`; the text is encoded with the run's CLIP skip (see `run_clip_skip`)."""
    torch.manual_seed(config.resolved_seed())
    if config.train_model_precision == INT8:
        require_int8(ctx.bundle)
    bundle = ctx.bundle
    host = bundle.vae_dtype, bundle.clip_skip
    bundle.vae_dtype = weight_dtype(config.train_VAE_precision, bundle.device)
    bundle.clip_skip = run_clip_skip(config, bundle.clip_skip)
    try:
        with bundle.training():
            bundle.set_gradient_checkpointing(config.use_gradient_checkpointing)
            try:
                yield bundle
            finally:
                bundle.set_gradient_checkpointing(False)
    finally:
        bundle.vae_dtype, bundle.clip_skip = host


def run_clip_skip(config: TrainConfig, host_clip_skip: int) -> int:
    """The setting's CLIP skip; left at 1 (its default), the host's own (the WebUI's Clip skip, 1 standalone)."""
    return config.clip_skip if config.clip_skip != 1 else host_clip_skip


def finish(ctx: RunContext, writer: LoraWriter, result: LoopResult, *, save_final: bool = True) -> TrainResult:
    """Save the final (or, when stopped, the original's `<stem>_<k>steps`) file and describe the outcome."""
    if result.stopped:
        path = writer.save(f"_{result.steps}steps", result.steps) if ctx.stop.save and result.steps else None
        message = f"Stopped at step {result.steps}." + (f" Saved {path}" if path else " Nothing saved.")
        return TrainResult(path, result.steps, result.losses, True, writer.saved, message)
    path = writer.save("", result.steps) if save_final else None
    message = f"Successfully created {path}" if path else "Finished."
    return TrainResult(path, result.steps, result.losses, False, writer.saved, message)
