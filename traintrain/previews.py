"""iLECO previews: what the model draws for the Original / Target prompt, to check the prompts before training.

The WebUI draws them with its own txt2img pipeline (its sampler, `<lora:…>` in prompts, saved like txt2img images);
standalone, `draw` samples the bundle itself: deterministic DDIM with classifier-free guidance.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from PIL import Image

from traintrain.config import TrainConfig
from traintrain.data.images import to_image
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelBundle

PREVIEW_STEPS = 20
PREVIEW_CFG = 7.0
WHICH = ("original", "target", "all")
PREVIEW_BUSY = "A training is using the model now: make previews when it has finished, or stop it."


@dataclass(frozen=True)
class PreviewRequest:
    """One image to draw."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int = PREVIEW_STEPS
    cfg_scale: float = PREVIEW_CFG


def preview_requests(config: TrainConfig, which: str, seed: int | None = None) -> list[PreviewRequest]:
    """The Original, the Target, or both ("all", one seed for both so they compare), at iLECO's image size, with
    the Negative Prompt; `seed` None draws one."""
    if which not in WHICH:
        raise TrainTrainError(f"Preview {which!r}: choose one of {', '.join(WHICH)}.")
    prompts = {"original": [config.original_prompt], "target": [config.target_prompt]}
    chosen = prompts[which] if which != "all" else prompts["original"] + prompts["target"]
    if which != "target" and not config.original_prompt.strip():
        raise TrainTrainError("Write the Original Prompt first.")
    height, width = config.image_size
    seed = secrets.randbelow(2**32) if seed is None else seed
    return [PreviewRequest(prompt, config.negative_prompt, width, height, seed) for prompt in chosen]


@torch.no_grad()
def draw(bundle: ModelBundle, request: PreviewRequest) -> Image.Image:
    """Sample `request` from the bundle: DDIM (η = 0) over `steps` evenly spaced timesteps, guided by the prompt
    against the negative prompt."""
    device = bundle.device
    alphas = bundle.alphas_cumprod.to(device, torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    shape = (1, 4, request.height // 8, request.width // 8)
    latents = torch.randn(shape, generator=generator).to(device)
    cond = bundle.encode_text([request.prompt, request.negative_prompt])
    timesteps = torch.linspace(len(alphas) - 1, 0, request.steps, device=device).round().long()
    for index, t in enumerate(timesteps):
        output = bundle.predict(latents.repeat(2, 1, 1, 1), t.repeat(2), cond).float()
        guided = output[1:] + request.cfg_scale * (output[:1] - output[1:])
        a = alphas[t]
        a_next = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.ones_like(a)
        if bundle.prediction == "v":
            x0 = a.sqrt() * latents - (1 - a).sqrt() * guided
            eps = a.sqrt() * guided + (1 - a).sqrt() * latents
        else:
            eps = guided
            x0 = (latents - (1 - a).sqrt() * eps) / a.sqrt()
        latents = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return to_image(bundle.decode_latents(latents)[0])
