"""Network types (lierla, c3lier, loha) trained on the tiny SD1 / SDXL models: the loss falls, the file has the keys and
shapes the public loaders expect, diffusers (LoRA / LoCon) and peft (LoHa) load it, and the file applied by hand to the
base weights gives exactly the trained network's output. Also: the text-encoder learning rate and SD2 v-prediction."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import traintrain.loop
import traintrain.modes.lora
from traintrain.demo import demo_config, write_sample_images
from traintrain.models.diffusers_backend import Components, DiffusersBundle
from traintrain.models.ldm_convert import unet_ldm_to_diffusers_names
from traintrain.models.tiny import build_tiny, build_tiny_components
from traintrain.modes import OutputDirs, RunContext, TrainResult, run_training
from traintrain.networks.kohya_io import module_names, read_network_file, save_network
from traintrain.networks.network import Network, NetworkSpec

KINDS = ("sd1", "sdxl")
TYPES = ("lierla", "c3lier", "loha")
ITERATIONS = 30
LEARNING_RATE = 2e-2  # the tiny SDXL's attention (lierla) sits at 4×4 and 2×2 latents only: it learns slowly
TRIGGER = "demo style"
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 8, 4.0, 4, 2.0  # 3×3 convs get their own rank / alpha, so a mix-up shows
LORA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
UNET_BLOCK_PATH = re.compile(r"^(down_blocks|mid_block|up_blocks)\.")  # diffusers paths of the UNet's blocks
# kohya's UNet names: SDXL compvis-style (LDM paths), SD1 / SD2 diffusers-style
UNET_NAME = {
    "sdxl": re.compile(r"^lora_unet_(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_"),
    "sd1": re.compile(
        r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_(attentions|resnets|downsamplers|upsamplers)_"
    ),
}
TEXT_LAYER = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn|mlp)_")
PROMPTS = [f"{TRIGGER}, a red circle on a white background", "a blue square"]


@dataclasses.dataclass
class Trained:
    """One LoRA-mode run: the model it trained on, the trained network object, and what the saved file says."""

    kind: str
    network_type: str
    bundle: DiffusersBundle
    network: Network
    result: TrainResult
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def dirs_in(tmp: Path) -> OutputDirs:
    return OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")


@contextlib.contextmanager
def captured(module: object, name: str) -> Iterator[list]:
    """Patch `module.name` so that every object it returns is also appended to the yielded list."""
    built: list = []
    original = getattr(module, name)

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, recording)
        yield built


def train(tmp: Path, config, kind: str) -> tuple[DiffusersBundle, Network, TrainResult]:
    """A real LoRA-mode run on a fresh tiny model; returns the model, the trained network object and the result."""
    bundle = build_tiny(kind)
    with captured(traintrain.modes.lora, "build_network") as networks:
        result = run_training(RunContext(config, bundle, dirs_in(tmp)))
    assert len(networks) == 1
    return bundle, networks[0], result


@pytest.fixture(scope="module", params=[(k, t) for k in KINDS for t in TYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def trained(request, images, tmp_path_factory) -> Trained:
    kind, network_type = request.param
    config = dataclasses.replace(
        demo_config(images, iterations=ITERATIONS),
        network_type=network_type,
        network_rank=RANK,
        network_alpha=ALPHA,
        network_conv_rank=CONV_RANK,
        network_conv_alpha=CONV_ALPHA,
        train_learning_rate=LEARNING_RATE,
        save_precision="fp32",
        logging_save_csv=False,
        save_lora_name=f"{kind}-{network_type}",
    )
    bundle, network, result = train(tmp_path_factory.mktemp("run"), config, kind)
    tensors, metadata = read_network_file(result.path)
    return Trained(kind, network_type, bundle, network, result, tensors, metadata)


def kohya_parts(components: Components) -> list[tuple[str, nn.Module, dict[str, str] | None]]:
    """(kohya prefix, model part, LDM path per module path or None): lora_unet, then lora_te (SD1 / SD2) or lora_te1 /
    lora_te2 (SDXL). kohya names SDXL's UNet modules by their LDM path (compvis-style), every other part by its path."""
    encoders = components.text_encoders
    prefixes = ["lora_te"] if len(encoders) == 1 else [f"lora_te{i + 1}" for i in range(len(encoders))]
    ldm = None
    if components.kind == "sdxl":
        ldm = {hf: ldm for ldm, hf in unet_ldm_to_diffusers_names(components.unet.config).items()}
    return [
        ("lora_unet", components.unet, ldm),
        *((prefix, encoder, None) for prefix, encoder in zip(prefixes, encoders)),
    ]


def kohya_modules(part: nn.Module, prefix: str, ldm: dict[str, str] | None) -> dict[str, tuple[str, nn.Module]]:
    """kohya name (prefix + module path, or its LDM path, with dots as underscores) → (module path, module), for every
    module (with an LDM path: every module holding parameters)."""
    return {
        f"{prefix}_{(path if ldm is None else ldm[path]).replace('.', '_')}": (path, module)
        for path, module in part.named_modules()
        if ldm is None or path in ldm
    }


def model_layers(components: Components) -> dict[str, tuple[str, nn.Module]]:
    """Every Linear / Conv2d of the model: kohya name → (module path in its part, module)."""
    return {
        name: (path, module)
        for prefix, part, ldm in kohya_parts(components)
        for name, (path, module) in kohya_modules(part, prefix, ldm).items()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def file_delta(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    """ΔW of one module by the WebUI / LyCORIS rules (alpha / rank, rank = dim 0 of lora_down / hada_w1_b).

    LoRA: up @ down (a k×k conv down is combined with the 1×1 up as the WebUI does, by a convolution);
    LoHa: (w1_a @ w1_b) ⊙ (w2_a @ w2_b) as plain matrix products (LyCORIS / ComfyUI: a 4-D `hada_w*_b` fails there),
    reshaped to the layer's weight.
    """
    alpha = float(tensors[f"{name}.alpha"])
    if f"{name}.hada_w1_a" in tensors:
        w1a, w1b, w2a, w2b = (tensors[f"{name}.hada_{part}"] for part in ("w1_a", "w1_b", "w2_a", "w2_b"))
        rank = w1b.shape[0]
        delta = (w1a @ w1b) * (w2a @ w2b)
    else:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            delta = up.flatten(1) @ down.flatten(1)
    return (delta * (alpha / rank)).reshape(shape)


def merged_bundle(kind: str, tensors: dict[str, torch.Tensor]) -> DiffusersBundle:
    """A fresh tiny model with every module of the file merged into its weights: W + ΔW."""
    components = build_tiny_components(kind)
    layers = model_layers(components)
    assert module_names(tensors) <= set(layers), "every module of the file names a layer of the model"
    with torch.no_grad():
        for name in module_names(tensors):
            weight = layers[name][1].weight
            weight += file_delta(tensors, name, weight.shape)
    return DiffusersBundle(components)


@torch.no_grad()
def outputs(bundle: DiffusersBundle) -> dict[str, torch.Tensor]:
    """Text-encoder output (context, SDXL pooled) and UNet prediction for fixed prompts, latents and timesteps."""
    cond = bundle.encode_text(PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    result = {"context": cond.context, "unet": bundle.predict(latents, torch.tensor([50, 700]), cond)}
    if cond.pooled is not None:
        result["pooled"] = cond.pooled
    return result


def hooked_outputs(t: Trained) -> dict[str, torch.Tensor]:
    """Outputs of the training model with the trained network hooked on."""
    with t.network.applied():
        return outputs(t.bundle)


def assert_same_outputs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")


def expected_modules(layers: dict[str, tuple[str, nn.Module]], network_type: str) -> set[str]:
    """kohya's rule: attention and MLP linears of the text encoders and every layer of the UNet's transformers;
    c3lier and loha add the resnets and down / up samplers (UNet layers outside the down / mid / up blocks never)."""
    return {
        name
        for name, (path, _) in layers.items()
        if TEXT_LAYER.match(name)
        or (
            name.startswith("lora_unet_")
            and UNET_BLOCK_PATH.match(path)
            and (network_type != "lierla" or ".attentions." in path)
        )
    }


@torch.no_grad()
def denoising_loss(bundle: DiffusersBundle, images: Path) -> float:
    """MSE of the model's prediction on the captioned training images at fixed noise and timesteps 100, 300 … 900,
    against the ε target (or v = √ᾱ·ε − √(1−ᾱ)·x₀ for v-prediction): a noise-free measure of what training learnt."""
    files = sorted(images.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)) for f in files])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the VAE samples its latent distribution
        latents = bundle.encode_images(pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).repeat(5, 1, 1, 1)
    timesteps = torch.arange(100, 1000, 200).repeat_interleave(len(files))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    a = bundle.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if bundle.prediction == "v" else noise
    captions = [f"{TRIGGER}, {f.with_suffix('.txt').read_text()}" for f in files] * 5
    return F.mse_loss(bundle.predict(noisy, timesteps, bundle.encode_text(captions)), target).item()


def assert_loss_falls(bundle: DiffusersBundle, network: Network, losses: list[float], images: Path) -> None:
    """The training curve falls, and the trained network lowers the fixed-noise loss by at least 4 %."""
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, f"the training loss should fall: first 10 steps {first:.4f}, last 10 {last:.4f}"
    before = denoising_loss(bundle, images)
    with network.applied():
        after = denoising_loss(bundle, images)
    assert after < 0.96 * before, f"fixed-noise loss: untrained {before:.4f}, trained {after:.4f}"


def test_loss_falls(trained: Trained, images: Path) -> None:
    assert trained.result.steps == ITERATIONS and len(trained.result.losses) == ITERATIONS
    assert_loss_falls(trained.bundle, trained.network, trained.result.losses, images)


def test_file_holds_the_selected_modules_with_public_key_names(trained: Trained) -> None:
    layers = model_layers(build_tiny_components(trained.kind))
    names = module_names(trained.tensors)
    assert names == expected_modules(layers, trained.network_type)
    assert names == set(trained.network.adapters)
    prefixes = {name.split("_text_model_")[0] for name in names if name.startswith("lora_te")}
    assert prefixes == ({"lora_te1", "lora_te2"} if trained.kind == "sdxl" else {"lora_te"})
    parts = LOHA_PARTS if trained.network_type == "loha" else LORA_PARTS
    assert set(trained.tensors) == {f"{name}.{part}" for name in names for part in parts}
    unet = {name for name in names if name.startswith("lora_unet_")}
    assert unet and all(UNET_NAME[trained.kind].match(name) for name in unet)
    paths = {layers[name][0] for name in unet}
    if trained.network_type != "lierla":
        assert any(p.endswith("resnets.0.conv1") for p in paths) and any("downsamplers.0.conv" in p for p in paths)
        if trained.kind == "sdxl":  # the upsampler the WebUI's diffusers-name rules drop; kohya's conv names
            assert "up_blocks.0.upsamplers.0.conv" in paths and "lora_unet_output_blocks_1_2_conv" in unet
            assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_2_0_op"} <= unet


def test_file_shapes_ranks_and_alphas(trained: Trained) -> None:
    layers = model_layers(build_tiny_components(trained.kind))
    assert all(t.dtype == torch.float32 for t in trained.tensors.values()), "save precision fp32"
    for name in module_names(trained.tensors):
        weight = layers[name][1].weight
        out_dim, in_dim, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        wide = kernel not in ((), (1, 1))
        rank, alpha = (CONV_RANK, CONV_ALPHA) if wide else (RANK, ALPHA)
        shape = lambda part: tuple(trained.tensors[f"{name}.{part}"].shape)  # noqa: E731
        assert trained.tensors[f"{name}.alpha"].dim() == 0 and float(trained.tensors[f"{name}.alpha"]) == alpha
        if trained.network_type == "loha":
            assert shape("hada_w1_a") == shape("hada_w2_a") == (out_dim, rank), name
            assert shape("hada_w1_b") == shape("hada_w2_b"), name
            assert shape("hada_w1_b") == (rank, weight[0].numel()), f"{name}: LyCORIS' flat (rank, in·k·k) layout"
        else:
            assert shape("lora_down.weight") == (rank, in_dim, *kernel), name
            assert shape("lora_up.weight") == (out_dim, rank, *((1, 1) if kernel else ())), name


def test_metadata_describes_the_network(trained: Trained) -> None:
    meta = trained.metadata
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[trained.kind]
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    args = json.loads(meta["ss_network_args"])
    if trained.network_type == "lierla":
        assert meta["ss_network_module"] == "networks.lora" and args == {}
    else:
        assert (args["conv_dim"], args["conv_alpha"]) == (str(CONV_RANK), str(CONV_ALPHA))
        assert args["algo"] == {"c3lier": "locon", "loha": "loha"}[trained.network_type]
        module = "lycoris.kohya" if trained.network_type == "loha" else "networks.lora"
        assert meta["ss_network_module"] == module


def test_file_applied_by_hand_equals_the_trained_network(trained: Trained) -> None:
    """What was trained is what the file says: W + alpha/rank·ΔW from the file alone reproduces the hooked model."""
    hooked = hooked_outputs(trained)
    base = outputs(trained.bundle)
    assert (hooked["unet"] - base["unet"]).abs().max() > 1e-2, "the trained network must change the UNet output"
    assert (hooked["context"] - base["context"]).abs().max() > 1e-3, "the text encoder was trained (BASE ticked)"
    assert_same_outputs(outputs(merged_bundle(trained.kind, trained.tensors)), hooked)


def diffusers_pipeline(components: Components):
    """A diffusers pipeline over `components` (SD1 or SDXL), for `load_lora_weights`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    c = components
    common = dict(vae=c.vae, unet=c.unet, scheduler=DDIMScheduler(), text_encoder=c.text_encoders[0])
    if c.kind == "sdxl":
        return StableDiffusionXLPipeline(
            **common, tokenizer=c.tokenizers[0], text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1]
        )
    return StableDiffusionPipeline(
        **common, tokenizer=c.tokenizers[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def peft_wrapped(components: Components) -> set[str]:
    """kohya names of the layers a peft adapter wraps (modules holding `lora_A` or `hada_w1_a` weights)."""
    return {
        name
        for prefix, part, ldm in kohya_parts(components)
        for name, (_, module) in kohya_modules(part, prefix, ldm).items()
        if len(getattr(module, "lora_A", ())) or len(getattr(module, "hada_w1_a", ()))
    }


def load_loha_with_peft(components: Components, tensors: dict[str, torch.Tensor]) -> None:
    """Wrap the file's layers with peft's LyCORIS LoHa (rank / alpha per module from the file) and copy the weights in."""
    from peft import LoHaConfig, inject_adapter_in_model

    for prefix, part, ldm in kohya_parts(components):
        modules = kohya_modules(part, prefix, ldm)
        chosen = {modules[name][0]: name for name in module_names(tensors) if name in modules}
        ranks = {path: int(tensors[f"{name}.hada_w1_b"].shape[0]) for path, name in chosen.items()}
        alphas = {path: float(tensors[f"{name}.alpha"]) for path, name in chosen.items()}
        config = LoHaConfig(r=1, alpha=1.0, target_modules=list(chosen), rank_pattern=ranks, alpha_pattern=alphas)
        inject_adapter_in_model(config, part)
        with torch.no_grad():
            for path, name in chosen.items():
                layer = part.get_submodule(path)
                for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                    param = getattr(layer, key)["default"]
                    param.copy_(tensors[f"{name}.{key}"].view(param.shape))  # peft keeps conv w*_b flat, as saved


def test_public_loader_applies_the_file(trained: Trained) -> None:
    """diffusers' kohya converter (lierla, c3lier) / peft's LoHa (loha) wrap every module and give the trained output."""
    components = build_tiny_components(trained.kind)
    if trained.network_type == "loha":
        load_loha_with_peft(components, trained.tensors)
    else:
        diffusers_pipeline(components).load_lora_weights(
            str(trained.result.path.parent), weight_name=trained.result.path.name
        )
    assert peft_wrapped(components) == module_names(trained.tensors)
    assert_same_outputs(outputs(DiffusersBundle(components)), hooked_outputs(trained))


def test_diffusers_refuses_loha_files(tmp_path) -> None:
    """A known gap, not ours: diffusers 0.31's kohya converter knows only lora_down / lora_up, so LoHa files load in
    the WebUI (and LyCORIS / peft) but not with `load_lora_weights`."""
    bundle = build_tiny("sd1")
    network = Network.build(NetworkSpec("loha", rank=2, alpha=1.0, blocks=["M00"]), bundle.lora_targets())
    save_network(tmp_path / "loha.safetensors", network, {}, torch.float32, 1.0)
    pipe = diffusers_pipeline(bundle.components)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        pipe.load_lora_weights(str(tmp_path), weight_name="loha.safetensors")


def lr_columns(log: Path) -> list[list[float]]:
    """The `Learning Rate k` columns of a CSV log, one list per row."""
    rows = list(csv.reader(log.read_text().splitlines()[8:]))
    header = rows[0]
    assert header[:2] == ["Step", "Loss"] and header[-1] == "Raw Loss"
    return [[float(v) for v in row[2:-1]] for row in rows[1:]]


@pytest.mark.parametrize("te_lr, expected", [(1e-3, [1e-3, 1e-2]), (0.0, [1e-2, 1e-2])])
def test_text_encoder_learning_rate_is_its_own_group(images, tmp_path, te_lr: float, expected: list[float]) -> None:
    config = dataclasses.replace(
        demo_config(images, iterations=3), train_learning_rate=1e-2, train_textencoder_learning_rate=te_lr
    )
    with captured(traintrain.loop, "build_optimizer") as optimizers:
        _, network, result = train(tmp_path, config, "sd1")
    groups = optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["text_encoder", "unet"]
    assert [g["lr"] for g in groups] == expected
    te_params = {id(p) for name in network.text_encoder_names for p in network.adapters[name].parameters()}
    assert {id(p) for p in groups[0]["params"]} == te_params and te_params
    assert not te_params & {id(p) for p in groups[1]["params"]}
    (log,) = (tmp_path / "logs").glob("*/demo-*.csv")
    assert lr_columns(log) == [expected] * 3
    _, metadata = read_network_file(result.path)
    assert float(metadata["ss_text_encoder_lr"]) == expected[0]


def test_without_base_there_is_one_unet_group(images, tmp_path) -> None:
    blocks = [b for b in demo_config(images).network_blocks if b != "BASE"]
    config = dataclasses.replace(demo_config(images, iterations=2), network_blocks=blocks)
    with captured(traintrain.loop, "build_optimizer") as optimizers:
        _, network, _ = train(tmp_path, config, "sd1")
    assert [g["name"] for g in optimizers[0].param_groups] == ["unet"] and not network.text_encoder_names
    (log,) = (tmp_path / "logs").glob("*/demo-*.csv")
    assert lr_columns(log) == [[config.train_learning_rate]] * 2


def test_sd2_v_prediction_trains_and_says_so(images, tmp_path) -> None:
    config = dataclasses.replace(demo_config(images, iterations=ITERATIONS), train_learning_rate=LEARNING_RATE)
    bundle, network, result = train(tmp_path, config, "sd2")
    assert bundle.prediction == "v"
    assert_loss_falls(bundle, network, result.losses, images)  # the fixed-noise loss is measured against v
    tensors, meta = read_network_file(result.path)
    assert meta["ss_v2"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert meta["ss_base_model_version"] == "sd_v2" and meta["modelspec.architecture"].startswith("stable-diffusion-v2")
    assert any(name.startswith("lora_te_") for name in module_names(tensors))
