"""Data-parallel training over torch.distributed, for runs started by `torchrun` or `accelerate launch`.

Every rank runs the same mode on the global batch (batch × world size) drawn from the same seeded streams and keeps
its own slice of each step's inputs, so N ranks × batch b train exactly as one process × batch N·b. Gradients of
the network's parameters (never the frozen model) are averaged by a bucketed all-reduce before each optimizer step;
the losses the loop reads back are averaged too, so every rank sees the same NaN. Rank 0 alone writes files; stop
requests are agreed on over a CPU (gloo) group. Outside a launcher (the WebUI, `python -m traintrain`) all of this
is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.progress import StopFlag
from traintrain.step import StepInputs, TrainingStep

log = logging.getLogger(__name__)

BUCKET_BYTES = 25 * 2**20  # gradients all-reduced per flat bucket of at most this size (as DDP's default)
MAIN = 0

_control: dist.ProcessGroup | None = None  # gloo group for host-side messages (stop flags, paths, shapes)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_environment(environ: dict[str, str] | None = None) -> Launch | None:
    """The launch `torchrun` / `accelerate launch` describe (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); None for one process."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise TrainTrainError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} is not set: start several processes with "
            "`torchrun` or `accelerate launch`, or unset WORLD_SIZE for one process."
        )
    return Launch(int(env["RANK"]), world_size, int(env["LOCAL_RANK"]))


@contextlib.contextmanager
def process_group() -> Iterator[Launch | None]:
    """Join the launcher's process group for the block (NCCL on CUDA, one GPU per local rank; gloo on the CPU);
    without a launcher, nothing."""
    global _control
    launch = launch_from_environment()
    if launch is None:
        yield None
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", launch.local_rank))
        _control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        _control = None  # the default group is gloo already
    log.info("Rank %d of %d (%s)", launch.rank, launch.world_size, dist.get_backend())
    try:
        yield launch
    finally:
        _control = None
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several training ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks training together (1 without a launcher)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return dist.get_rank() if active() else MAIN


def is_main() -> bool:
    """Whether this process writes the files (rank 0, or the only process)."""
    return rank() == MAIN


def with_global_batch(config: TrainConfig) -> TrainConfig:
    """The config the modes run with: `train batch size` is per rank, so they draw batch × world size per step."""
    if not active():
        return config
    second = config.second_pass
    if second is not None:
        second = dataclasses.replace(second, train_batch_size=second.train_batch_size * world_size())
    return dataclasses.replace(config, train_batch_size=config.train_batch_size * world_size(), second_pass=second)


def sharded(step: TrainingStep, global_batch: int) -> TrainingStep:
    """`step` with each rank's share of the inputs: rows `rank·b … rank·b+b-1` of every per-sample tensor (leading
    size `global_batch`); shared tensors stay whole. The global draw keeps a batch's bucket whole across ranks."""
    if not active():
        return step
    count = world_size()
    if global_batch % count:
        raise ValueError(f"A global batch of {global_batch} does not split over {count} ranks.")
    share, start = global_batch // count, rank() * (global_batch // count)

    def inputs(index: int) -> StepInputs:
        drawn = step.inputs(index)
        tensors = {
            name: t.narrow(0, start, share) if t.dim() and t.shape[0] == global_batch else t
            for name, t in drawn.tensors.items()
        }
        return StepInputs(tensors, drawn.variant)

    return TrainingStep(inputs, step.loss)


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Average the gradients of `parameters` over the ranks in place: flattened into buckets of at most
    `BUCKET_BYTES`, one all-reduce each. Every rank runs the same code, so the same parameters have gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world_size())
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients grouped by dtype and device, each group up to `BUCKET_BYTES`."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        same_kind = not bucket or (grad.dtype, grad.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not same_kind or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += nbytes
    if bucket:
        yield bucket


def gradient_sync() -> Callable[[list[torch.Tensor]], None] | None:
    """What the optimizer step runs on the gradients before stepping: their average over ranks, or None alone."""
    return average_gradients if active() else None


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over the ranks (the losses the loop logs and checks: a NaN on one rank reaches all)."""
    if not active():
        return values
    total = values.float().clone()
    dist.all_reduce(total)
    return total / world_size()


def broadcast_parameters(parameters: Iterator[torch.Tensor] | list[torch.Tensor]) -> None:
    """Give every rank rank 0's starting weights (they are seeded alike; this makes it a guarantee)."""
    if not active():
        return
    with torch.no_grad():
        for param in parameters:
            dist.broadcast(param.data, MAIN)


class SharedStop(StopFlag):
    """A stop flag the ranks agree on once per check: a request on any rank stops all of them after the same step,
    saving when any request asked to save. Wraps the process's own flag (Ctrl-C, SIGTERM, a test)."""

    def __init__(self, local: StopFlag) -> None:
        super().__init__()
        self.local = local
        self._agreed = False

    def request(self, save: bool = True) -> None:
        self.local.request(save)

    @property
    def requested(self) -> bool:
        if self._agreed:
            return True
        flags = torch.tensor([self.local.requested, self.local.requested and self.local.save], dtype=torch.int32)
        dist.all_reduce(flags, dist.ReduceOp.MAX, group=_control)
        if flags[0]:
            self._agreed = True
            self.local.request(save=bool(flags[1]))
            self.save = self.local.save
        return self._agreed


def shared_stop(stop: StopFlag) -> StopFlag:
    """The stop flag the loop should check: agreed over ranks when distributed, else `stop` itself."""
    return SharedStop(stop) if active() else stop


def written_by_main(write: Callable[[], Path]) -> Path:
    """Run `write` on rank 0 only, the others waiting; every rank returns rank 0's path, or raises its error."""
    if not active():
        return write()
    text, failed = "", False
    if is_main():
        try:
            path = write()
            text = str(path)
        except TrainTrainError as error:
            text, failed = str(error), True
            _broadcast_text(text, failed)
            raise
    text, failed = _broadcast_text(text, failed)
    if failed:
        raise TrainTrainError(text)
    return Path(text)


def _broadcast_text(text: str, failed: bool) -> tuple[str, bool]:
    """Rank 0's `text` and `failed` on every rank (a length header, then UTF-8 bytes; nothing pickled)."""
    data = text.encode()
    header = torch.tensor([len(data), int(failed)], dtype=torch.int64)
    dist.broadcast(header, MAIN, group=_control)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_main() and data else None
    if buffer is None:
        buffer = torch.zeros(int(header[0]), dtype=torch.uint8)
    if buffer.numel():
        dist.broadcast(buffer, MAIN, group=_control)
    return bytes(buffer.tolist()).decode(), bool(header[1])


Encoder = Callable[[torch.Tensor], torch.Tensor]
_LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def encoded_by_main(encode: Encoder) -> Encoder:
    """`encode` run on rank 0 only, its result broadcast to the others (they wait): the latent cache is then exactly
    the one a single process builds (a VAE samples its posterior from rank 0's seeded stream, in one order)."""
    if not active():
        return encode

    def shared(pixels: torch.Tensor) -> torch.Tensor:
        latents = encode(pixels).contiguous() if is_main() else None  # sent in memory order: the receivers' order
        header = torch.zeros(8, dtype=torch.int64)  # shape (up to 6 dims), dtype index, number of dims
        if latents is not None:
            header[: latents.dim()] = torch.tensor(latents.shape)
            header[6], header[7] = _LATENT_DTYPES.index(latents.dtype), latents.dim()
        dist.broadcast(header, MAIN, group=_control)
        if latents is None:
            shape, dtype = header[: int(header[7])].tolist(), _LATENT_DTYPES[int(header[6])]
            latents = torch.empty(shape, dtype=dtype, device=_device_of_collectives(pixels.device))
        dist.broadcast(latents, MAIN)
        return latents

    return shared


def _device_of_collectives(default: torch.device) -> torch.device:
    """Where tensors for the default group live: this rank's GPU under NCCL, else `default`."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else default
