"""DDPM maths: noising, targets, min-SNR weights, timesteps, masked loss."""

from __future__ import annotations

import pytest
import torch

from traintrain.diffusion import NoiseSchedule, per_sample_loss, weighted_loss
from traintrain.errors import TrainTrainError

BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
ALPHAS = torch.cumprod(1 - BETAS, 0)


def test_add_noise_and_targets() -> None:
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    eps = NoiseSchedule(ALPHAS, "epsilon")
    noisy = eps.add_noise(x0, noise, t)
    a = ALPHAS[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.equal(eps.target(x0, noise, t), noise)
    v = NoiseSchedule(ALPHAS, "v").target(x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # x0 is recovered from x_t and v: x0 = sqrt(a)·x_t - sqrt(1-a)·v
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-5)


def test_min_snr_weights() -> None:
    t = torch.tensor([10, 900])
    snr = ALPHAS[t] / (1 - ALPHAS[t])
    eps = NoiseSchedule(ALPHAS, "epsilon").snr_weights(t, 5.0)
    torch.testing.assert_close(eps, torch.minimum(5.0 / snr, torch.ones(2)))
    assert eps[0] < 1 and eps[1] == 1  # low t (high SNR) is down-weighted
    v = NoiseSchedule(ALPHAS, "v").snr_weights(t, 5.0)
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_timesteps_range_shared_and_seeded() -> None:
    s = NoiseSchedule(ALPHAS, "epsilon")
    g = torch.Generator().manual_seed(0)
    t = s.sample_timesteps(1000, 200, 400, g)
    assert t.min() >= 200 and t.max() < 400
    shared = s.sample_timesteps(4, 0, 1000, g, shared=True)
    assert len(set(shared.tolist())) == 1
    again = s.sample_timesteps(1000, 200, 400, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(TrainTrainError, match="empty"):
        s.sample_timesteps(2, 500, 500, g)


def test_masked_loss_ignores_outside() -> None:
    pred, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    target[..., 0, 0] = 2.0  # error only where the mask is 0
    mask = torch.ones(1, 1, 2, 2)
    mask[..., 0, 0] = 0
    assert per_sample_loss(pred, target, "MSE", mask).item() == 0.0
    assert per_sample_loss(pred, target, "MSE").item() == pytest.approx(1.0)
    assert per_sample_loss(pred, target, "L1").item() == pytest.approx(0.5)
    s = NoiseSchedule(ALPHAS, "epsilon")
    assert weighted_loss(s, pred, target, torch.tensor([999]), snr_gamma=5.0).item() == pytest.approx(1.0)
    with pytest.raises(TrainTrainError, match="Unknown loss"):
        per_sample_loss(pred, target, "huber")
