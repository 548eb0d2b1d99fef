"""The bare reference step: the same UNet with plain adapters, fused AdamW and, on CUDA, one CUDA graph."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from traintrain.bench.settings import ALPHA, LEARNING_RATE, PROMPTS, RANK, BenchSettings, Measurement
from traintrain.bench.timing import PeakMemory, bench_config, sync_device
from traintrain.models.bundle import ModelBundle


class PlainLoRA(nn.Module):
    """The reference adapter: base(x) + up(down(x)) · alpha/rank with plain nn.Linear (1×1 nn.Conv2d) factors."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, device: torch.device) -> None:
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, device=device)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=device)
        elif isinstance(base, nn.Conv2d) and tuple(base.kernel_size) == (1, 1):
            self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False, device=device)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        else:
            raise TypeError(f"The reference adapts Linear and 1x1 Conv2d layers, not {base}.")
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.up(self.down(x)) * self.scale if self.enabled else out


@contextlib.contextmanager
def plain_adapters(root: nn.Module, layers: list[nn.Module], device: torch.device) -> Iterator[list[PlainLoRA]]:
    """Swap each of `layers` inside `root` for a PlainLoRA around it; the original layers are put back on exit."""
    wanted = {id(layer) for layer in layers}
    slots = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if id(child) in wanted
    ]
    adapters = [PlainLoRA(child, RANK, ALPHA, device) for _, _, child in slots]
    try:
        for (parent, name, _), adapter in zip(slots, adapters):
            setattr(parent, name, adapter)
        yield adapters
    finally:
        for parent, name, child in slots:
            setattr(parent, name, child)


def unet_of(bundle: ModelBundle) -> nn.Module:
    """The bundle's UNet module (the diffusers adapter keeps it among its components)."""
    return bundle.unet if hasattr(bundle, "unet") else bundle.components.unet


def _reference_step(
    bundle: ModelBundle, adapters: list[PlainLoRA], settings: BenchSettings, optimizer: torch.optim.Optimizer
) -> Callable[[], torch.Tensor]:
    """One step with static inputs: noise and timesteps drawn on the device, UNet forward (iLECO: first a no-grad
    forward without the adapters for the target), MSE loss, backward, optimizer step; returns the detached loss."""
    device, dtype = bundle.device, bundle.dtype
    batch, side = settings.batch, settings.side
    with torch.no_grad():
        conds = [bundle.encode_text([prompt]).detach().repeat(batch).to(device, dtype) for prompt in PROMPTS]
    latents = torch.randn(batch, 4, side // 8, side // 8, device=device)
    alphas = bundle.alphas_cumprod
    autocast = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if device.type == "cuda" else None
    ileco = settings.mode == "ileco"

    def predict(x: torch.Tensor, t: torch.Tensor, which: int) -> torch.Tensor:
        """UNet output for original (0) / target (1) through the adapter's thin `predict` (every input is already on
        the device; SDXL's size ids are built once per shape, in the eager warm-up)."""
        return bundle.predict(x, t, conds[which])

    def step() -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            t = torch.randint(0, len(alphas), (batch,), device=device)
            noise = torch.randn_like(latents)
            if ileco:
                x = noise
                with torch.no_grad():
                    for adapter in adapters:
                        adapter.enabled = False
                    target = predict(x, t, 1)
                    for adapter in adapters:
                        adapter.enabled = True
            else:
                a = alphas[t].view(-1, 1, 1, 1)
                x, target = a.sqrt() * latents + (1 - a).sqrt() * noise, noise
            loss = F.mse_loss(predict(x, t, 0).float(), target.float())
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _graphed(
    step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, warmup: int
) -> Callable[[], torch.Tensor]:
    """Capture `step` as one CUDA graph (after `warmup` eager steps on a side stream, as torch.cuda.graphs requires)
    and return its replay. The gradients are allocated by the captured backward, so they are never zeroed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 3)):  # also creates the optimizer state outside the graph
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    return replay


def _eager(step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return step()

    return run


def time_reference(bundle: ModelBundle, settings: BenchSettings, memory: PeakMemory) -> Measurement:
    """Time the bare step on the layers the mode trains (rank 16, fp32 adapters, frozen UNet in the bundle dtype)."""
    from traintrain.modes.common import network_spec

    device = bundle.device
    spec = network_spec(bench_config(settings, None, 1, device), text_encoder=False)
    layers = [t.module for t in bundle.lora_targets() if not t.name.startswith("lora_te") and spec.accepts(t)]
    with bundle.training(), plain_adapters(unet_of(bundle), layers, device) as adapters:
        bundle.set_gradient_checkpointing(settings.grad_ckpt)
        params = [p for adapter in adapters for p in (adapter.down.weight, adapter.up.weight)]
        cuda = device.type == "cuda"
        kwargs = {"fused": True, "capturable": settings.graph} if cuda else {"foreach": True}
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, **kwargs)
        step = _reference_step(bundle, adapters, settings, optimizer)
        memory.reset()
        run, note = _eager(step, optimizer), "eager"
        if cuda and settings.graph:
            try:
                run, note = _graphed(step, optimizer, settings.warmup), "CUDA graph"
            except RuntimeError as error:  # an op that cannot be captured: report it and time the eager step
                note = f"eager, CUDA graph capture failed: {str(error).splitlines()[0][:160]}"
        for _ in range(settings.warmup):
            run()
        sync_device(device)
        begin = time.perf_counter()
        for _ in range(settings.steps):
            loss = run()
        sync_device(device)
        seconds = time.perf_counter() - begin
    return Measurement(settings.steps, seconds, settings.batch, memory.peak(), float(loss), note)
