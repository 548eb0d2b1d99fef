"""The one training loop: optimizer and scheduler, how steps run (eager, compiled, CUDA graphs, accumulated), weight
EMA, periodic save, CSV log, progress, stop flag, NaN guard."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from traintrain import distributed
from traintrain.csvlog import CsvLog
from traintrain.cuda_graphs import CapturedSteps, CudaGraphBackend
from traintrain.ema import WeightAverage
from traintrain.errors import TrainTrainError
from traintrain.networks.network import Network
from traintrain.optim import (
    Scheduler,
    build_optimizer,
    build_scheduler,
    current_lrs,
    graph_refusal,
    is_schedule_free,
    needs_metric,
)
from traintrain.progress import Progress, ProgressCallback, StopFlag
from traintrain.step import AccumulatingSteps, EagerSteps, OptimizerStep, StepInputs, TrainingStep
from traintrain.tensorboard import EventWriter
from traintrain.train_state import TrainingState, capture_state, restore_state

log = logging.getLogger(__name__)

StepRunner = Callable[[StepInputs], torch.Tensor]  # one optimizer step on the inputs -> detached loss
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
    cuda_graph: bool = True  # capture each step signature as a CUDA graph where safe (CUDA only)
    compile: bool = False  # torch.compile the loss computation
    accumulation: int = 1  # batches per optimizer step (their losses averaged); above 1 the steps run eagerly
    max_grad_norm: float = 0.0  # clip the gradient norm to this before each optimizer step; 0 = off
    ema_decay: float = 0.0  # keep an EMA of the weights and leave it in the network at the end; 0 = off
    block_lr_weights: dict[str, float] = field(default_factory=dict)  # lr weight per block; empty: two groups
    seed: int = 0  # the run's seed, recorded in saved training states


@dataclass
class LoopResult:
    """What happened: steps done, the loss of every step, and why it ended."""

    steps: int
    losses: list[float] = field(default_factory=list)
    stopped: bool = False


Saver = Callable[[str, int], Path]  # (file-name suffix, steps done) -> saved path
StateSaver = Callable[[str, TrainingState], Path]  # (file-name suffix, state) -> saved path


def run_loop(
    settings: LoopSettings,
    network: Network,
    step: TrainingStep,
    *,
    save: Saver,
    csv_log: CsvLog | None = None,
    progress: ProgressCallback | None = None,
    stop: StopFlag | None = None,
    phase: str = "",
    save_state: StateSaver | None = None,
    resume: TrainingState | None = None,
    tensorboard: EventWriter | None = None,
) -> LoopResult:
    """Train `network` for `settings.iterations` steps of `step`; periodic saves go through `save`, and the full
    training state (periodic, on stop, at the end) through `save_state` when given. With `resume` the run goes on
    from the state's step: weights, optimizer, scheduler and EMA restored, the seeded draws replayed up to there."""
    device = next(network.parameters()).device
    graphs = settings.cuda_graph and device.type == "cuda" and not distributed.active()  # data-parallel: eager
    params = network.param_groups(settings.learning_rate, settings.text_encoder_lr or None, settings.block_lr_weights)
    optimizer = build_optimizer(
        settings.optimizer, params, settings.learning_rate, settings.optimizer_settings, capturable=graphs
    )
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
    run_step = _step_runner(settings, step, optimizer, scheduler, device, graphs)
    average = WeightAverage(network.parameters(), settings.ema_decay) if settings.ema_decay > 0 else None
    scaler = run_step.step.scaler
    result = LoopResult(steps=0)
    start = 0
    if resume is not None:
        start = restore_state(resume, network, optimizer, scheduler, scaler, average)
        result.steps = start
        for micro in range(start * settings.accumulation):  # the data order and the noise go on where they stopped
            step.inputs(micro)

    def save_state_now(suffix: str, done: int) -> None:
        if save_state is not None:
            save_state(suffix, capture_state(done, settings.seed, network, optimizer, scheduler, scaler, average))

    if is_schedule_free(optimizer):  # schedule-free optimizers keep separate train / eval weights
        optimizer.train()
    pending: list[tuple[int, torch.Tensor, list[float | torch.Tensor]]] = []
    sync_every = readback_interval(device)
    started = time.monotonic()
    network.train()

    plateau = needs_metric(scheduler)

    def flush() -> None:
        if not pending:
            return
        losses = distributed.mean_across_ranks(torch.stack([loss for _, loss, _ in pending]))
        values = losses.float().cpu().tolist()
        for (number, _, read_lrs), value in zip(pending, values):
            lrs = [float(lr) for lr in read_lrs]  # device tensors under CUDA graphs: read now, after the sync above
            if not math.isfinite(value):
                raise TrainTrainError(
                    f"The loss became {value} at step {number}: training stopped and the last good save is kept. "
                    f"Likely causes: a learning rate too high ({lrs[-1]:.3g}), or fp16 overflow (try bf16 or fp32 "
                    "model precision, or a lower network alpha)."
                )
            result.losses.append(value)
            if plateau:  # reduce_on_plateau steps on the losses read back here: no extra device sync per step
                scheduler.step(value)
            if csv_log is not None:
                csv_log.add(number, value, lrs)
            if tensorboard is not None:
                names = [str(group.get("name", i)) for i, group in enumerate(optimizer.param_groups)]
                tensorboard.scalars(number, {"loss": value, **{f"lr/{n}": lr for n, lr in zip(names, lrs)}})
        last_step = pending[-1][0]
        pending.clear()
        if csv_log is not None:
            csv_log.flush()
        if tensorboard is not None:
            tensorboard.flush()
        if progress is not None:
            elapsed = time.monotonic() - started
            eta = elapsed / (last_step - start) * (settings.iterations - last_step)
            progress(Progress(last_step, settings.iterations, result.losses[-1], lrs[-1], elapsed, eta, phase))

    for index in range(start, settings.iterations):
        if stop is not None and stop.requested:
            result.stopped = True
            if stop.save and index > start:
                save_state_now(f"-step{index}", index)
            break
        done = index + 1
        try:
            lrs = current_lrs(optimizer)
            loss = _accumulated(run_step, step, index, settings.accumulation)
        except torch.cuda.OutOfMemoryError as error:
            raise TrainTrainError(
                f"Out of GPU memory at step {done}: turn on gradient checkpointing, or lower the batch size, image "
                "size or network rank."
            ) from error
        if average is not None:
            average.update()
        if scheduler is not None and not plateau:
            scheduler.step()
        result.steps = done
        pending.append((done, loss, lrs))
        periodic = settings.save_every > 0 and done % settings.save_every == 0 and done < settings.iterations
        if len(pending) >= sync_every or periodic or done == settings.iterations:
            flush()
        if periodic:
            with _evaluation_weights(optimizer), average.applied() if average else contextlib.nullcontext():
                save(f"_{done}steps", done)
            save_state_now(f"_{done}steps", done)
    flush()
    if not result.stopped and settings.iterations == result.steps > start:
        save_state_now("", result.steps)
    if is_schedule_free(optimizer):
        optimizer.eval()  # the evaluation weights are the ones to save
    if average is not None:
        average.copy_to_parameters()  # the average is what the final (or stop) save writes
    return result


def _accumulated(run_step: StepRunner, step: TrainingStep, index: int, count: int) -> torch.Tensor:
    """One optimizer step's loss: `count` batches (micro-steps index·count … index·count + count-1), each run_step
    call adding its gradients (the runner steps the optimizer after the last); the losses, each divided by `count`
    already, summed."""
    if count == 1:
        return run_step(step.inputs(index))
    return torch.stack([run_step(step.inputs(index * count + micro)) for micro in range(count)]).sum()


def _step_runner(
    settings: LoopSettings,
    step: TrainingStep,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler | None,
    device: torch.device,
    graphs: bool,
) -> StepRunner:
    """How each step runs: replayed CUDA graphs where the setting and the device allow (the optimizer step inside
    them when it can be captured), else eagerly; the loss computation compiled when asked."""
    count = settings.accumulation
    loss = step.loss if count == 1 else lambda inputs: step.loss(inputs) / count
    optimizer_step = OptimizerStep(
        loss,
        optimizer,
        settings.autocast_dtype,
        device,
        compile=settings.compile,
        max_grad_norm=settings.max_grad_norm,
        gradient_sync=distributed.gradient_sync(),
    )
    if count > 1:
        if graphs:
            log.info("Gradient accumulation runs its steps eagerly, without CUDA graphs.")
        return AccumulatingSteps(optimizer_step, count)
    if not graphs:
        return EagerSteps(optimizer_step)
    refusal = graph_refusal(optimizer, scheduler)
    if refusal:
        log.info("The optimizer steps outside the CUDA graphs: %s.", refusal)
    return CapturedSteps(optimizer_step, CudaGraphBackend(), whole_step=not refusal)


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
