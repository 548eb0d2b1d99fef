"""A tiny SD1 model with real structure: `build_tiny("sd1")` pretrained in code on coloured shapes with their prompts.

The random-weight tiny model barely depends on its prompt (the contexts of different prompts are ~0.97 cosine
similar) and is no denoiser, so checks such as "an iLECO LoRA moves an unrelated prompt much less than the original"
or "the Multi-ADDifT loss falls" cannot be shown on it. `pretrained_tiny` gives it structure in two short phases:

1. Text encoder (200 steps, ~2.5 s): the contexts of the prompts "a <colour> <shape>" and "" are pushed apart (their
   pairwise cosine similarity driven to ~0), as a contrastively trained CLIP text tower keeps captions apart. Without
   this phase the UNet learns to ignore the near-identical contexts: after 300-600 steps of phase 2 alone (text
   encoder trained along at 0.1-30x the UNet's lr) the right and a wrong prompt gave the same denoising loss.
2. UNet (600 steps of 8, ~23 s): full fine-tune, plain AdamW with a one-cycle lr, with the standard epsilon objective
   (uniform timesteps, MSE to the noise) on 64x64 images of red / green / blue / yellow circles, squares and triangles
   at three sizes, each with its prompt (one caption in ten dropped to "", so "" is the unconditional model).

The result denoises those images (epsilon loss 0.96 -> 0.14) and depends on its prompt (on a noised red circle at
t=200 the loss is 0.18 with "a red circle", 0.21 with "", 0.25 with "a blue square"). Deterministic (fixed seeds; the
global RNG is left untouched); about 26 s on one CPU thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from traintrain.data.images import to_pixels
from traintrain.diffusion import NoiseSchedule
from traintrain.models.diffusers_backend import DiffusersBundle
from traintrain.models.tiny import build_tiny

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
BIG, MEDIUM, SMALL = (12, 12, 52, 52), (18, 18, 46, 46), (24, 24, 40, 40)  # boxes centred in 64x64


def draw(shape: str, color: str, box: tuple[int, int, int, int] = BIG, size: int = 64) -> Image.Image:
    """A `shape` filled with the colour named `color` inside `box`, on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen, fill = ImageDraw.Draw(image), COLORS[color]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        left, top, right, bottom = box
        pen.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def circle(path: Path, color: tuple[int, int, int], box=(12, 12, 52, 52), size=(64, 64)) -> str:
    """Save a circle of the RGB `color` in `box` on white to `path`; the path as a string."""
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).ellipse(box, fill=color)
    image.save(path)
    return str(path)


def prompt_of(color: str, shape: str) -> str:
    return f"a {color} {shape}"


@dataclass
class Pretrained:
    """The pretrained bundle and what its pretraining cost and reached."""

    bundle: DiffusersBundle
    seconds: float
    separation: float  # mean squared pairwise cosine similarity of the prompts' contexts after phase 1
    losses: list[float] = field(default_factory=list)  # the epsilon loss of every phase-2 step

    def mean_loss(self, part: slice) -> float:
        values = self.losses[part]
        return sum(values) / len(values)


def _separate_prompts(bundle: DiffusersBundle, prompts: list[str], steps: int, lr: float) -> float:
    """Phase 1: train the text encoder so the contexts of different prompts are near orthogonal."""
    encoder = bundle.components.text_encoders[0]
    parameters = list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    others = ~torch.eye(len(prompts), dtype=torch.bool)
    loss = torch.zeros(())
    for _ in range(steps):
        flat = F.normalize(bundle.encode_text(prompts).context.flatten(1), dim=-1)
        loss = (flat @ flat.T)[others].pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def _training_set(bundle: DiffusersBundle, boxes: tuple, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents of every colour x shape x size and their prompts."""
    images, prompts = [], []
    for color in COLORS:
        for shape in SHAPES:
            for box in boxes:
                images.append(to_pixels(draw(shape, color, box)))
                prompts.append(prompt_of(color, shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # encode_images samples the (narrow) posterior
        latents = bundle.encode_images(torch.stack(images))
    return latents, prompts


def pretrained_tiny(
    *,
    steps: int = 600,
    batch: int = 8,
    lr: float = 3e-3,
    separation_steps: int = 200,
    separation_lr: float = 3e-3,
    uncond: float = 0.1,
    boxes: tuple = (BIG, MEDIUM, SMALL),
    seed: int = 0,
) -> Pretrained:
    """`build_tiny("sd1")` with its text encoder (phase 1) and UNet (phase 2) trained as the module docstring says;
    every module back in eval mode with frozen weights afterwards."""
    started = time.perf_counter()
    bundle = build_tiny("sd1", seed=seed)
    unet, encoder = bundle.components.unet, bundle.components.text_encoders[0]
    latents, prompts = _training_set(bundle, boxes, seed)
    vocabulary = sorted(set(prompts)) + [""]
    for module in (bundle.components.unet, bundle.components.vae, *bundle.components.text_encoders):
        module.eval().requires_grad_(False)
    try:
        encoder.train().requires_grad_(True)
        separation = _separate_prompts(bundle, vocabulary, separation_steps, separation_lr)
        encoder.eval().requires_grad_(False)
        with torch.no_grad():
            contexts = bundle.encode_text(vocabulary)
        prompt_index = torch.tensor([vocabulary.index(p) for p in prompts])
        empty = len(vocabulary) - 1

        unet.train().requires_grad_(True)
        generator = torch.Generator().manual_seed(seed)
        schedule = NoiseSchedule(bundle.alphas_cumprod, bundle.prediction)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        losses = []
        for _ in range(steps):
            index = torch.randint(0, len(latents), (batch,), generator=generator)
            dropped = torch.rand(batch, generator=generator) < uncond
            cond = contexts.select(torch.where(dropped, empty, prompt_index[index]))
            noise = torch.randn((batch, *latents.shape[1:]), generator=generator)
            timesteps = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator)
            prediction = bundle.predict(schedule.add_noise(latents[index], noise, timesteps), timesteps, cond)
            loss = F.mse_loss(prediction, schedule.target(latents[index], noise, timesteps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        for module in (unet, encoder):
            module.eval().requires_grad_(False)
    return Pretrained(bundle, time.perf_counter() - started, separation, losses)
