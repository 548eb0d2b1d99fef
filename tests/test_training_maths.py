"""Training maths against independent references, on models where wrong maths shows: adapters against the kohya /
LyCORIS formulas written out here, min-SNR weighting of the batch loss, and the production denoising objective on the
pretrained shapes model (tests/conditioned_tiny.py), whose denoising depends on the timestep and the noise schedule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conditioned_tiny import BIG, COLORS, SHAPES, draw, prompt_of
from traintrain.config import TrainConfig
from traintrain.data.images import to_pixels
from traintrain.diffusion import NoiseSchedule, per_sample_loss, weighted_loss
from traintrain.models.bundle import LoraTarget
from traintrain.modes.common import Objective
from traintrain.networks.network import Network, NetworkSpec
from traintrain.step import StepInputs

MULTIPLIER = 0.7  # a strength other than 1, as ADDifT's ±0.25 steps and the UI's strength use


def adapter_output(network_type: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(output with the adapter at MULTIPLIER, input, the adapter's tensors) for random adapter weights."""
    spec = NetworkSpec(network_type, rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0)
    role = "resnet" if isinstance(layer, nn.Conv2d) else "attn1"
    network = Network.build(spec, [LoraTarget("lora_unet_layer", layer, "IN01", role)])
    torch.manual_seed(3)
    for parameter in network.parameters():
        parameter.data.normal_(0, 0.3)
    x = torch.randn(2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 6)
    with torch.no_grad(), network.applied(), network.multiplier(MULTIPLIER):
        out = layer(x)
    (adapter,) = network.adapters.values()
    return out, x, dict(adapter.named_parameters())


@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_adapters_follow_the_kohya_and_lycoris_formulas(network_type: str) -> None:
    torch.manual_seed(0)
    conv = network_type != "lierla"
    layer = nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(6, 8)
    out, x, p = adapter_output(network_type, layer)
    scale = 3.0 / 2 if conv else 2.0 / 4  # conv alpha / conv rank for 3x3 convs, alpha / rank otherwise
    if network_type == "loha":
        delta_w = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        expected = layer(x) + MULTIPLIER * scale * F.conv2d(x, delta_w.view(8, 6, 3, 3), padding=1)
    elif conv:  # LoCon: 3x3 down, 1x1 up
        hidden = F.conv2d(x, p["lora_down.weight"], padding=1)
        expected = layer(x) + MULTIPLIER * scale * F.conv2d(hidden, p["lora_up.weight"])
    else:
        expected = layer(x) + MULTIPLIER * scale * (x @ p["lora_down.weight"].T @ p["lora_up.weight"].T)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_min_snr_weights_reach_the_batch_loss() -> None:
    schedule = NoiseSchedule(torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0), "epsilon")
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 300, 950])
    loss = weighted_loss(schedule, prediction, target, timesteps, snr_gamma=5.0)
    snr = schedule.alphas_cumprod[timesteps] / (1 - schedule.alphas_cumprod[timesteps])
    expected = (per_sample_loss(prediction, target) * torch.clamp(5.0 / snr, max=1.0)).mean()
    torch.testing.assert_close(loss, expected)
    assert weighted_loss(schedule, prediction, target, timesteps) == per_sample_loss(prediction, target).mean()


def training_images(bundle) -> tuple[torch.Tensor, list[str]]:
    """Latents of every big coloured shape the model was pretrained on, and their prompts."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    pixels = torch.stack([to_pixels(draw(shape, color, BIG)) for color, shape in pairs])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        latents = bundle.encode_images(pixels)
    return latents, [prompt_of(color, shape) for color, shape in pairs]


def production_loss(bundle, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor) -> float:
    """The LoRA mode's objective (noising, target, loss) as the trainer computes it, without min-SNR weights."""
    objective = Objective(bundle, TrainConfig(train_snr_gamma=0.0))
    inputs = StepInputs({"latents": latents, "noise": noise, "timesteps": timesteps})
    with torch.no_grad():
        return objective.denoising_loss(bundle, inputs, cond).item()


def reference_loss(bundle, latents: torch.Tensor, cond, timesteps: torch.Tensor, noise: torch.Tensor) -> float:
    """The same written out (DDPM: x_t = √ᾱ·x0 + √(1-ᾱ)·ε, ε target, MSE), calling the diffusers UNet itself."""
    alpha = bundle.components.alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # the schedule it was pretrained with
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        prediction = bundle.components.unet(noisy, timesteps, encoder_hidden_states=cond.context).sample
    return (prediction - noise).pow(2).mean().item()


def test_the_objective_is_ddpm_and_the_pretrained_model_denoises_with_it(shapes_model) -> None:
    bundle = shapes_model.bundle
    latents, prompts = training_images(bundle)
    cond = bundle.encode_text(prompts)
    n = len(prompts)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
    for timesteps in (torch.linspace(0, 999, n).long(), torch.full((n,), 850)):
        ours, reference = (f(bundle, latents, cond, timesteps, noise) for f in (production_loss, reference_loss))
        assert abs(ours - reference) < 1e-5 * reference, f"the trainer's objective is not DDPM's: {ours} vs {reference}"
    high = production_loss(bundle, latents, cond, torch.linspace(500, 950, n).long(), noise)
    spread = production_loss(bundle, latents, cond, torch.linspace(0, 999, n).long(), noise)
    # Measured (pretraining seed 0, mean of noise seeds 11-13): t in 500-950 0.061, t in 0-999 0.123. The UNet told
    # 999 - t: 0.097 / 0.251; told t / 2: 0.089 / 0.138; noising without square roots: 0.058 / 0.206; an x0 or v
    # target for this ε model: above 1.2 (one noise draw, as here: 0.062 / 0.186).
    assert high < 0.08 and spread < 0.3, f"the pretrained model denoises under the objective ({high:.3f}, {spread:.3f})"
