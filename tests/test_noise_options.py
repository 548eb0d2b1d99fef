"""Noise offset, pyramid noise, input perturbation, timestep distributions and debiased weighting act as described."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from traintrain.config import TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.diffusion import NoiseSchedule, weighted_loss
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.modes.common import Objective
from traintrain.noise import NoiseOptions, draw_noise
from traintrain.timesteps import TimestepSampling, draw_timesteps

SHAPE = (64, 4, 32, 32)


def schedule() -> NoiseSchedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return NoiseSchedule(torch.cumprod(1 - betas, 0), "epsilon")


def noise(**options) -> torch.Tensor:
    return draw_noise(SHAPE, torch.Generator().manual_seed(0), NoiseOptions(**options))


def channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def low_frequency_share(x: torch.Tensor) -> float:
    """Share of the spectrum's energy in the lowest 1/8 of frequencies (DC excluded)."""
    power = torch.fft.fft2(x).abs() ** 2
    power[..., 0, 0] = 0
    low = power[..., :4, :4].sum() + power[..., -4:, :4].sum() + power[..., :4, -4:].sum() + power[..., -4:, -4:].sum()
    return float(low / power.sum())


def test_defaults_draw_exactly_the_original_gaussian():
    assert torch.equal(noise(), torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))


def test_noise_offset_spreads_the_mean_of_each_image_and_channel():
    plain, offset = channel_means(noise()), channel_means(noise(offset=0.1))
    assert plain.std() < 0.05  # 1024 pixels: std of a mean is 1/32
    assert abs(float(offset.std()) - (0.1**2 + 1 / 1024) ** 0.5) < 0.02
    # the per-pixel deviation from the channel mean is the same Gaussian: the offset is constant per channel
    assert torch.allclose(noise(offset=0.1) - offset[..., None, None], noise() - plain[..., None, None], atol=1e-5)


def test_pyramid_noise_has_unit_std_and_more_low_frequencies():
    plain, pyramid = noise(), noise(multires_iterations=6, multires_discount=0.5)
    stds = pyramid.flatten(1).std(dim=1)
    assert torch.allclose(stds, torch.ones_like(stds), atol=1e-5)
    assert low_frequency_share(pyramid) > 2 * low_frequency_share(plain)
    weaker = noise(multires_iterations=6, multires_discount=0.1)
    assert low_frequency_share(plain) < low_frequency_share(weaker) < low_frequency_share(pyramid)


def test_uniform_sampling_is_the_original_draw():
    s, g1, g2 = schedule(), torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps(s, 16, 100, 900, g1), s.sample_timesteps(16, 100, 900, g2))


@pytest.mark.parametrize("kind", ["logit_normal", "shifted"])
def test_other_samplings_stay_in_range_and_can_share(kind):
    t = draw_timesteps(schedule(), 5000, 200, 700, torch.Generator().manual_seed(0), TimestepSampling(kind))
    assert t.dtype == torch.long and int(t.min()) >= 200 and int(t.max()) <= 699
    shared = draw_timesteps(schedule(), 4, 0, 1000, torch.Generator(), TimestepSampling(kind), shared=True)
    assert len(set(shared.tolist())) == 1 and shared.shape == (4,)


def test_logit_normal_concentrates_mid_range_and_its_mean_moves_it():
    draw = lambda sampling: draw_timesteps(schedule(), 20000, 0, 1000, torch.Generator().manual_seed(0), sampling)  # noqa: E731
    uniform, logit = draw(TimestepSampling()), draw(TimestepSampling("logit_normal"))
    middle = lambda t: float(((t >= 250) & (t < 750)).float().mean())  # noqa: E731
    assert abs(middle(uniform) - 0.5) < 0.02 and middle(logit) > 0.65  # N(0,1) through a sigmoid: 0.73 inside
    assert abs(float(logit.float().mean()) - 500) < 10
    assert float(draw(TimestepSampling("logit_normal", logit_mean=1.0)).float().mean()) > 650


def test_shifted_sampling_moves_toward_noisier_steps_by_the_formula():
    t = draw_timesteps(schedule(), 20000, 0, 1000, torch.Generator().manual_seed(0), TimestepSampling("shifted", shift=3))
    # P(t < 500) = P(3u / (1 + 2u) < 0.5) = P(u < 0.25)
    assert abs(float((t < 500).float().mean()) - 0.25) < 0.01
    same = draw_timesteps(schedule(), 20000, 0, 1000, torch.Generator().manual_seed(0), TimestepSampling("shifted", shift=1))
    assert abs(float((same < 500).float().mean()) - 0.5) < 0.01


def test_debiased_weights_are_inverse_root_snr_and_multiply_the_loss():
    s = schedule()
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(s.debiased_weights(t), 1 / s.snr[t].clamp(max=1000).sqrt())
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    plain = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    debiased = weighted_loss(s, prediction, target, t, debiased=True)
    assert torch.allclose(debiased, (plain * s.debiased_weights(t)).mean())
    both = weighted_loss(s, prediction, target, t, snr_gamma=5.0, debiased=True)
    assert torch.allclose(both, (plain * s.snr_weights(t, 5.0) * s.debiased_weights(t)).mean())
    v = NoiseSchedule(s.alphas_cumprod, "v")
    assert torch.allclose(v.debiased_weights(t), 1 / (s.snr[t].clamp(max=1000) + 1))


def test_input_perturbation_noises_the_input_but_not_the_target():
    bundle = build_tiny("sd1")
    latents = torch.randn(2, 4, 8, 8)
    objective = Objective(bundle, TrainConfig(train_input_perturbation=0.1))
    draws = objective.noised(latents, torch.Generator().manual_seed(0))
    extra = (draws["input_noise"] - draws["noise"]) / 0.1
    assert 0.8 < float(extra.std()) < 1.2 and abs(float(extra.mean())) < 0.2
    assert "input_noise" not in Objective(bundle, TrainConfig()).noised(latents, torch.Generator())
    seen = []
    bundle_predict = bundle.predict
    bundle.predict = lambda noisy, t, cond, sizes=None: seen.append(noisy) or bundle_predict(noisy, t, cond, sizes)  # type: ignore[method-assign]
    cond = bundle.encode_text(["a", "b"])
    from traintrain.step import StepInputs

    objective.denoising_loss(bundle, StepInputs(draws), cond)
    t = draws["timesteps"]
    assert torch.allclose(seen[0], objective.schedule.add_noise(latents, draws["input_noise"], t))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def losses(images: Path, tmp: Path, **changes) -> list[float]:
    config = dataclasses.replace(demo_config(images, iterations=4), logging_save_csv=False, **changes)
    return run_training(RunContext(config, build_tiny("sd1"), OutputDirs(tmp, tmp, tmp))).losses


def test_each_option_changes_a_real_training_and_defaults_do_not(images, tmp_path):
    base = losses(images, tmp_path / "base")
    assert losses(images, tmp_path / "same", train_timestep_sampling="uniform", train_noise_offset=0.0) == base
    for change in (
        {"train_noise_offset": 0.1},
        {"train_multires_noise_iterations": 4},
        {"train_input_perturbation": 0.1},
        {"train_timestep_sampling": "logit_normal"},
        {"train_timestep_sampling": "shifted"},
        {"train_debiased_estimation": True},
    ):
        changed = losses(images, tmp_path / next(iter(change)), **change)
        assert len(changed) == 4 and changed != base, change
