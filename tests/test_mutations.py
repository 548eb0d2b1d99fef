"""The suite's power, tested: each mutant below is a deliberate bug of one class (timestep wiring, forward noising,
ε / v target, LoRA / LoHa / LoCon scaling, strength, min-SNR weighting, a mode objective pointing the wrong way or at
the wrong prompt, data handling) applied by monkeypatching, and the real tests that guard that class are run
in-process against it: at least one must fail with an AssertionError, or the mutant survived.

Module-level functions that other modules import by name are mutated through their `__code__`, so every reference
sees the bug, as a source mutation would.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import test_data_buckets
import test_data_dataset
import test_diffusion
import test_modes
import test_networks
import test_training_maths
from traintrain.data import dataset as dataset_module
from traintrain.data.dataset import Sample
from traintrain.diffusion import NoiseSchedule
from traintrain.models.diffusers_backend import DiffusersBundle
from traintrain.modes import addift, difference, ileco
from traintrain.networks import kohya_io
from traintrain.networks.modules import AdapterModule, LoHaModule, LoRAModule
from traintrain.networks.network import NetworkSpec

Patch = Callable[[pytest.MonkeyPatch], None]
_counter = itertools.count()


@dataclass
class Mutant:
    """A bug (`apply`) and the real tests that must catch it ("module.test_name" or with "[param]")."""

    name: str
    apply: Patch
    killers: tuple[Callable, ...]


def _wrap_method(cls: type, name: str, make: Callable[[Callable], Callable]) -> Patch:
    """A patch replacing `cls.name` with `make(original)`."""
    return lambda mp: mp.setattr(cls, name, make(getattr(cls, name)))


# ----- the bugs


def _timesteps_reversed(original):
    return lambda self, noisy, timesteps, cond, sizes=None: original(self, noisy, 999 - timesteps, cond, sizes)


def _noising_without_roots(self, latents, noise, timesteps):
    a = self.alphas_cumprod.to(timesteps.device)[timesteps].view(-1, *([1] * (latents.ndim - 1)))
    return a * latents + (1 - a) * noise


def _epsilon_target_is_the_image(original):
    return lambda self, latents, noise, timesteps: latents if self.prediction == "epsilon" else original(
        self, latents, noise, timesteps
    )


def _v_target_sign_swapped(original):
    return lambda self, latents, noise, timesteps: (
        -original(self, latents, noise, timesteps) if self.prediction == "v" else noise
    )


def _scale_rank_over_alpha(original):
    def init(self, base, rank, alpha):
        original(self, base, rank, alpha)
        self.scale = rank / float(alpha)

    return init


def _conv_alpha_ignored(self, module):
    kernel = getattr(module, "kernel_size", (1, 1))
    return (self.conv_rank or self.rank, self.alpha) if tuple(kernel) != (1, 1) else (self.rank, self.alpha)


def _loha_sum(self):
    weight = (self.hada_w1_a @ self.hada_w1_b + self.hada_w2_a @ self.hada_w2_b) * self.scale
    return weight.view(self.out_dim, self.in_dim, *self.kernel) if self.is_conv else weight


def _multiplier_ignored(self, x):
    return self.lora_up(self.lora_down(x)) * self.scale


def _strength_not_saved(network, dtype, strength=1.0):
    """`network_tensors` without `strength` (the mutant's code replaces the real function's)."""
    tensors = {}
    for name, adapter in network.adapters.items():
        if isinstance(adapter, LoRAModule):
            tensors[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach()
            tensors[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach()
        tensors[f"{name}.alpha"] = adapter.alpha.detach().clone()
    return {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}


def _snr_weights_ignored(self, timesteps, gamma):
    return torch.ones(timesteps.shape, device=timesteps.device)


def _snr_weights_inverted(self, timesteps, gamma):
    snr = self.snr.to(timesteps.device)[timesteps]
    return torch.clamp(snr, max=gamma) / gamma


def _ileco_swapped(original):
    return lambda bundle, network, objective, inputs, orig, target: original(
        bundle, network, objective, inputs, target, orig
    )


def _ileco_target_is_the_original(original):
    return lambda bundle, network, objective, inputs, orig, target: original(
        bundle, network, objective, inputs, orig, orig
    )


def _addift_sides_swapped(original):
    def loss(self, inputs):
        tensors = {**inputs.tensors, "original": inputs["target"], "target": inputs["original"]}
        return original(self, dataclasses.replace(inputs, tensors=tensors))

    return loss


def _pair_swapped(module) -> Patch:
    real = module.encode_image_pair
    return lambda mp: mp.setattr(module, "encode_image_pair", lambda bundle, o, t: real(bundle, t, o))


def _caption_ignored(real) -> Callable:
    return lambda path, trigger, use_filename_as_tag=False: real(Path("no-caption.png"), trigger)


def _trigger_dropped(real) -> Callable:
    return lambda path, trigger, use_filename_as_tag=False: real(path, "", use_filename_as_tag)


def _mirror_not_flipped(original):
    return lambda self, image=None: original(dataclasses.replace(self, mirror=False), image)


def _first_buckets(size, buckets, count):
    return list(buckets)[:count]


def _code(function: Callable, mutant: Callable) -> Patch:
    return lambda mp: mp.setattr(function, "__code__", mutant.__code__)


# ----- the guards: real tests, called with the fixtures they ask for


def _run(test: Callable, **params) -> Callable[[dict], None]:
    def call(fixtures: dict) -> None:
        wanted = inspect.signature(test).parameters
        arguments = {name: fixtures[name]() for name in wanted if name not in params}
        test(**arguments, **params)

    call.__name__ = f"{test.__module__}.{test.__name__}" + (f"{params}" if params else "")
    call.__wrapped__ = test  # type: ignore[attr-defined]
    return call


OBJECTIVE = _run(test_training_maths.test_the_objective_is_ddpm_and_the_pretrained_model_denoises_with_it)
NOISING = _run(test_diffusion.test_add_noise_and_targets)
ADAPTER = {t: _run(test_training_maths.test_adapters_follow_the_kohya_and_lycoris_formulas, network_type=t) for t in (
    "lierla", "c3lier", "loha")}  # fmt: skip
ILECO = _run(test_modes.test_ileco_makes_the_original_prompt_predict_the_target)
real_image_prompt = dataset_module.image_prompt

MUTANTS = [
    Mutant("timestep wiring: the UNet sees 999 - t", _wrap_method(DiffusersBundle, "predict", _timesteps_reversed),
           (OBJECTIVE,)),
    Mutant("forward noising: ᾱ·x0 + (1-ᾱ)·ε, no square roots",
           lambda mp: mp.setattr(NoiseSchedule, "add_noise", _noising_without_roots), (NOISING, OBJECTIVE)),
    Mutant("ε target: the clean latents", _wrap_method(NoiseSchedule, "target", _epsilon_target_is_the_image),
           (NOISING, OBJECTIVE)),
    Mutant("v target: sign swapped", _wrap_method(NoiseSchedule, "target", _v_target_sign_swapped), (NOISING,)),
    Mutant("LoRA scale: rank / alpha", _wrap_method(AdapterModule, "__init__", _scale_rank_over_alpha),
           (ADAPTER["lierla"],)),
    Mutant("LoCon: 3x3 convs take alpha, not conv alpha",
           lambda mp: mp.setattr(NetworkSpec, "rank_alpha_for", _conv_alpha_ignored), (ADAPTER["c3lier"],)),
    Mutant("LoHa: products summed", lambda mp: mp.setattr(LoHaModule, "delta_weight", _loha_sum),
           (ADAPTER["loha"],)),
    Mutant("strength: the multiplier is not applied in the forward",
           lambda mp: mp.setattr(LoRAModule, "delta", _multiplier_ignored), (ADAPTER["lierla"],)),
    Mutant("strength: not applied to the saved file", _code(kohya_io.network_tensors, _strength_not_saved),
           (_run(test_networks.test_strength_scales_delta_linearly),)),
    Mutant("min-SNR: weights ignored", lambda mp: mp.setattr(NoiseSchedule, "snr_weights", _snr_weights_ignored),
           (_run(test_diffusion.test_min_snr_weights), _run(test_training_maths.test_min_snr_weights_reach_the_batch_loss))),
    Mutant("min-SNR: weights inverted", lambda mp: mp.setattr(NoiseSchedule, "snr_weights", _snr_weights_inverted),
           (_run(test_diffusion.test_min_snr_weights),)),
    Mutant("iLECO: trains the Target prompt toward the Original",
           lambda mp: mp.setattr(ileco, "ileco_loss", _ileco_swapped(ileco.ileco_loss)), (ILECO,)),
    Mutant("iLECO: the reference is the Original prompt",
           lambda mp: mp.setattr(ileco, "ileco_loss", _ileco_target_is_the_original(ileco.ileco_loss)), (ILECO,)),
    Mutant("Difference: learns target -> original", _pair_swapped(difference),
           (_run(test_modes.test_difference_on_the_shapes_model_learns_original_to_target),)),
    Mutant("ADDifT: trained and reference sides swapped",
           _wrap_method(addift.DifferenceObjective, "loss", _addift_sides_swapped),
           (_run(test_modes.test_addift_moves_predictions_on_the_original_toward_the_target),)),
    Mutant("captions: the caption file is ignored",
           lambda mp: mp.setattr(dataset_module, "image_prompt", _caption_ignored(real_image_prompt)),
           (_run(test_data_dataset.test_prompts_use_trigger_and_captions),)),
    Mutant("trigger word: dropped",
           lambda mp: mp.setattr(dataset_module, "image_prompt", _trigger_dropped(real_image_prompt)),
           (_run(test_data_dataset.test_prompts_use_trigger_and_captions),)),
    Mutant("mirroring: the mirrored copy is not flipped", _wrap_method(Sample, "render", _mirror_not_flipped),
           (_run(test_data_dataset.test_design_example_one_image_gives_eight_samples),
            _run(test_data_dataset.test_rgba_image_gives_a_latent_size_mask_and_grey_background))),
    Mutant("buckets: the first buckets, not the nearest", _code(dataset_module.nearest_buckets, _first_buckets),
           (_run(test_data_buckets.test_main_bucket_is_nearest_ratio),
            _run(test_data_dataset.test_wide_image_is_cover_resized_and_centre_cropped, width=128, height=64,
                 stripe=(56, 72)))),
]  # fmt: skip


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_suite_kills_the_mutant(mutant: Mutant, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixtures = {
        "shapes_model": lambda: request.getfixturevalue("shapes_model"),
        "pair": lambda: request.getfixturevalue("pair"),
        "tmp_path": lambda: tmp_path / f"run{next(_counter)}",
    }
    for name in ("shapes_model", "pair"):  # built before the bug is in: fixtures are shared with the real tests
        if any(name in inspect.signature(k).parameters for k in _tests_of(mutant)):
            fixtures[name]()
    caught = []
    with pytest.MonkeyPatch.context() as mp:
        mutant.apply(mp)
        for killer in mutant.killers:
            path = tmp_path / f"run{next(_counter)}"
            path.mkdir()
            fixtures["tmp_path"] = lambda path=path: path
            try:
                killer(fixtures)
            except AssertionError:
                caught.append(killer.__name__)
                break
    assert caught, f"the mutant {mutant.name!r} survived {[k.__name__ for k in mutant.killers]}"


def _tests_of(mutant: Mutant) -> list[Callable]:
    """The test functions behind a mutant's guards."""
    return [killer.__wrapped__ for killer in mutant.killers]
