"""DDPM training maths: timesteps, forward noising, epsilon / v targets, min-SNR weights and the per-sample loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from traintrain.errors import TrainTrainError

LOSS_FUNCTIONS = ("MSE", "L1", "Smooth-L1")


class NoiseSchedule:
    """The forward process of a model, from its `alphas_cumprod`, and the training target of its prediction type."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str) -> None:
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction = prediction
        self.num_timesteps = int(alphas_cumprod.shape[0])
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def _coefficients(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(timesteps.device)[timesteps]
        shape = (-1,) + (1,) * (ndim - 1)
        return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε."""
        sa, sb = self._coefficients(timesteps, latents.ndim)
        return sa * latents + sb * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should predict: ε, or the velocity sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x_0 for v-prediction."""
        if self.prediction == "epsilon":
            return noise
        sa, sb = self._coefficients(timesteps, latents.ndim)
        return sa * noise - sb * latents

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights: min(γ/SNR, 1) for ε; min(SNR, γ)/(SNR+1) for v-prediction."""
        snr = self.snr.to(timesteps.device)[timesteps]
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction == "epsilon":
            return clipped / snr
        return clipped / (snr + 1.0)

    def debiased_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Debiased-estimation loss weights: 1/√SNR for ε, 1/(SNR+1) for v-prediction (SNR capped at 1000)."""
        snr = torch.clamp(self.snr.to(timesteps.device)[timesteps], max=1000.0)
        return 1.0 / snr.sqrt() if self.prediction == "epsilon" else 1.0 / (snr + 1.0)

    def sample_timesteps(
        self, batch: int, low: int, high: int, generator: torch.Generator, *, shared: bool = False
    ) -> torch.Tensor:
        """Uniform integer timesteps in [low, high); one for the whole batch when `shared`."""
        high = min(high, self.num_timesteps)
        if not 0 <= low < high:
            raise TrainTrainError(f"Timestep range [{low}, {high}) is empty: set min timesteps below max timesteps.")
        count = 1 if shared else batch
        t = torch.randint(low, high, (count,), generator=generator, device=generator.device)
        return t.expand(batch).clone() if shared else t


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str = "MSE", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per sample (mean over C,H,W), in float32; with a mask, the mean over the masked area only."""
    prediction, target = prediction.float(), target.float()
    if kind == "MSE":
        loss = F.mse_loss(prediction, target, reduction="none")
    elif kind == "L1":
        loss = F.l1_loss(prediction, target, reduction="none")
    elif kind == "Smooth-L1":
        loss = F.smooth_l1_loss(prediction, target, reduction="none")
    else:
        raise TrainTrainError(f"Unknown loss function {kind!r}: choose one of {', '.join(LOSS_FUNCTIONS)}.")
    dims = tuple(range(1, loss.ndim))
    if mask is None:
        return loss.mean(dim=dims)
    mask = mask.to(loss.dtype).expand_as(loss)
    return (loss * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1.0)


def weighted_loss(
    schedule: NoiseSchedule,
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    kind: str = "MSE",
    snr_gamma: float = 0.0,
    mask: torch.Tensor | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """The batch loss: per-sample loss, min-SNR weighted when `snr_gamma` > 0 and debiased-estimation weighted when
    `debiased`, averaged over the batch."""
    loss = per_sample_loss(prediction, target, kind, mask)
    if snr_gamma > 0:
        loss = loss * schedule.snr_weights(timesteps, snr_gamma)
    if debiased:
        loss = loss * schedule.debiased_weights(timesteps)
    return loss.mean()
