"""The one training loop: optimizer and scheduler, autocast, periodic save, CSV log, progress, stop flag, NaN guard."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from trainer.csvlog import CsvLog
from trainer.errors import TrainTrainError
from trainer.networks.network import Network
from trainer.optim import build_optimizer, build_scheduler, current_lrs, is_schedule_free, needs_metric
from trainer.progress import Progress, ProgressCallback, StopFlag

log = logging.getLogger(__name__)

StepLoss = Callable[[int], torch.Tensor]  # step index (0-based) -> scalar loss with grad
GPU_READBACK_EVERY = 10  # steps between loss read-backs on a GPU (each read-back waits for the device)


@dataclass
class LoopSettings:
    """What the loop needs from the training settings of one pass."""

    iterations: int
    learning_rate: float
    text_encoder_lr: float
    optimizer: str
    optimizer_settings: dict
    scheduler: str
    scheduler_settings: dict
    warmup_steps: int = 0
    num_cycles: int = 1
    power: float = 1.0
    step_rules: str = ""
    save_every: int = 0
    autocast_dtype: torch.dtype | None = None  # fp16 / bf16 on CUDA; None = no autocast


@dataclass
class LoopResult:
    """What happened: steps done, the loss of every step, and why it ended."""

    steps: int
    losses: list[float] = field(default_factory=list)
    stopped: bool = False


Saver = Callable[[str, int], Path]  # (file-name suffix, steps done) -> saved path


def run_loop(
    settings: LoopSettings,
    network: Network,
    step_loss: StepLoss,
    *,
    save: Saver,
    csv_log: CsvLog | None = None,
    progress: ProgressCallback | None = None,
    stop: StopFlag | None = None,
    phase: str = "",
) -> LoopResult:
    """Train `network` for `settings.iterations` steps of `step_loss`; periodic saves go through `save`."""
    params = network.param_groups(settings.learning_rate, settings.text_encoder_lr or None)
    optimizer = build_optimizer(settings.optimizer, params, settings.learning_rate, settings.optimizer_settings)
    scheduler = build_scheduler(
        settings.scheduler,
        optimizer,
        iterations=settings.iterations,
        warmup_steps=settings.warmup_steps,
        num_cycles=settings.num_cycles,
        power=settings.power,
        step_rules=settings.step_rules,
        settings=settings.scheduler_settings,
    )
    device = next(network.parameters()).device
    scaler = _grad_scaler(settings.autocast_dtype, device)
    if is_schedule_free(optimizer):  # schedule-free optimizers keep separate train / eval weights
        optimizer.train()
    result = LoopResult(steps=0)
    pending: list[tuple[int, torch.Tensor, list[float]]] = []
    sync_every = readback_interval(device)
    started = time.monotonic()
    network.train()

    plateau = needs_metric(scheduler)

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([loss for _, loss, _ in pending]).float().cpu().tolist()
        for (step, _, lrs), value in zip(pending, values):
            if not math.isfinite(value):
                raise TrainTrainError(
                    f"The loss became {value} at step {step}: training stopped and the last good save is kept. "
                    f"Likely causes: a learning rate too high ({lrs[-1]:.3g}), or fp16 overflow (try bf16 or fp32 "
                    "model precision, or a lower network alpha)."
                )
            result.losses.append(value)
            if plateau:  # reduce_on_plateau steps on the losses read back here: no extra device sync per step
                scheduler.step(value)
            if csv_log is not None:
                csv_log.add(step, value, lrs)
        last_step, _, lrs = pending[-1]
        pending.clear()
        if csv_log is not None:
            csv_log.flush()
        if progress is not None:
            elapsed = time.monotonic() - started
            eta = elapsed / last_step * (settings.iterations - last_step)
            progress(Progress(last_step, settings.iterations, result.losses[-1], lrs[-1], elapsed, eta, phase))

    for index in range(settings.iterations):
        if stop is not None and stop.requested:
            result.stopped = True
            break
        step = index + 1
        try:
            with _autocast(settings.autocast_dtype, device):
                loss = step_loss(index)
            lrs = current_lrs(optimizer)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        except torch.cuda.OutOfMemoryError as error:
            raise TrainTrainError(
                f"Out of GPU memory at step {step}: turn on gradient checkpointing, or lower the batch size, image "
                "size or network rank."
            ) from error
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None and not plateau:
            scheduler.step()
        result.steps = step
        pending.append((step, loss.detach(), lrs))
        periodic = settings.save_every > 0 and step % settings.save_every == 0 and step < settings.iterations
        if len(pending) >= sync_every or periodic or step == settings.iterations:
            flush()
        if periodic:
            with _evaluation_weights(optimizer):
                save(f"_{step}steps", step)
    flush()
    if is_schedule_free(optimizer):
        optimizer.eval()  # the evaluation weights are the ones to save
    return result


def readback_interval(device: torch.device) -> int:
    """Steps between loss read-backs, which are also the progress events: every step on the CPU, 10 on a GPU."""
    return 1 if device.type == "cpu" else GPU_READBACK_EVERY


@contextlib.contextmanager
def _evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Schedule-free optimizers hold their evaluation weights only in eval mode: saves happen there."""
    if not is_schedule_free(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def _autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    if dtype is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
