"""kohya / LyCORIS key format: network → tensors + `ss_*` metadata, files → adapter weights (safetensors only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from traintrain.errors import TrainTrainError
from traintrain.files import is_file, save_safetensors
from traintrain.models.bundle import LoraTarget
from traintrain.networks.hashes import safetensors_hashes
from traintrain.networks.key_styles import name_resolver
from traintrain.networks.kohya_check import LOHA_KEYS, module_kind_rank_alpha
from traintrain.networks.modules import ADAPTERS, AdapterModule, LoHaModule, LoRAModule
from traintrain.networks.network import Network, NetworkSpec



def network_tensors(network: Network, dtype: torch.dtype, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The file's tensors: `<name>.lora_down/up.weight` + `.alpha` (LoRA) or `.hada_w*` + `.alpha` (LoHa).

    `strength` scales ΔW linearly (applied to lora_up / hada_w1_a), so weight 1.0 in the WebUI applies strength × ΔW.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in network.adapters.items():
        if isinstance(adapter, LoRAModule):
            tensors[f"{name}.lora_down.weight"] = adapter.lora_down.weight.detach()
            tensors[f"{name}.lora_up.weight"] = adapter.lora_up.weight.detach() * strength
        elif isinstance(adapter, LoHaModule):  # LyCORIS' layout: conv `hada_w*_b` flat, (rank, in·k·k)
            tensors[f"{name}.hada_w1_a"] = adapter.hada_w1_a.detach() * strength
            tensors[f"{name}.hada_w1_b"] = adapter.hada_w1_b.detach().flatten(1)
            tensors[f"{name}.hada_w2_a"] = adapter.hada_w2_a.detach()
            tensors[f"{name}.hada_w2_b"] = adapter.hada_w2_b.detach().flatten(1)
        tensors[f"{name}.alpha"] = adapter.alpha.detach().clone()
    return {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}


def save_network(
    path: Path, network: Network, metadata: dict[str, str], dtype: torch.dtype, strength: float, steps: int = 0
) -> Path:
    """Write the network atomically (temp file in the same folder, then rename) and return the path.

    Weights that are NaN / inf at the save precision are refused: a broken file never replaces a good one."""
    tensors = network_tensors(network, dtype, strength)
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise TrainTrainError(
            f"The network weights became NaN or infinite (or too large for the save precision) by step {steps}: "
            "training stopped and the last good save is kept. Lower the learning rate or the network alpha."
        )
    metadata = {**metadata, **safetensors_hashes(tensors, metadata)}
    return save_safetensors(path, tensors, metadata)


def read_network_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file: `.safetensors`, or a `.pt` state dict read with
    `torch.load(weights_only=True)` (tensors only, nothing unpickled beyond them; no metadata)."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".pt"):
        raise TrainTrainError(f"{path.name}: only .safetensors and .pt LoRA files can be loaded.")
    if not is_file(path):
        raise TrainTrainError(f"LoRA file not found: {path}.")
    if path.suffix.lower() == ".pt":
        return _read_pt(path), {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise TrainTrainError(f"{path.name} is not a readable safetensors file: {error}.") from error


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    """A `.pt` LoRA's tensors, loaded with weights_only=True (no code can run); refused unless it is a flat
    name → tensor dict."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError … for unreadable files
        raise TrainTrainError(f"{path.name} is not a readable .pt LoRA (weights only): {error}.") from error
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise TrainTrainError(f"{path.name} holds no LoRA state dict (name → tensor): save it as .safetensors.")
    return data


def module_names(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The kohya module names present in a file's tensors."""
    return {key.split(".", 1)[0] for key in tensors}


def load_into(network: Network, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a file's weights into matching adapters (the inverse of `network_tensors` at strength 1); every tensor
    must have exactly its parameter's size (a LoHa convolution factor may be stored 4-D)."""
    for name, adapter in network.adapters.items():
        for key, param in _parameters_by_key(adapter):
            stored = tensors.get(f"{name}.{key}")
            if stored is None:
                raise TrainTrainError(f"The LoRA file has no {key} for {name}: it was made for another model or type.")
            fits = stored.numel() == param.numel() if adapter.kind == "loha" else stored.shape == param.shape
            if not fits:
                raise TrainTrainError(
                    f"The LoRA file does not fit this model at {name}: {key} is {tuple(stored.shape)}, the layer needs "
                    f"{tuple(param.shape)}. It was made for another model family."
                )
            param.data.copy_(stored.reshape(param.shape))


def in_target_style(tensors: dict[str, torch.Tensor], target_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors renamed to the targets' UNet naming style (diffusers ↔ compvis), so that an SDXL LoRA of the
    original TrainTrain (diffusers-style names) loads into compvis-named targets and the other way round."""
    resolve = name_resolver(module_names(tensors), target_names)
    renamed = {}
    for key, tensor in tensors.items():
        name, _, rest = key.partition(".")
        renamed[f"{resolve(name)}.{rest}"] = tensor
    return renamed


def _parameters_by_key(adapter: AdapterModule) -> list[tuple[str, torch.Tensor]]:
    """The adapter's trained parameters under their kohya key suffixes."""
    if isinstance(adapter, LoRAModule):
        return [("lora_down.weight", adapter.lora_down.weight), ("lora_up.weight", adapter.lora_up.weight)]
    return [(key, getattr(adapter, key)) for key in LOHA_KEYS]


def network_from_file(path: Path, targets: list[LoraTarget], *, text_encoder: bool = True) -> Network:
    """A network with exactly the modules, ranks, alphas and weights of a saved file (resume, copy machine);
    without `text_encoder`, the file's text-encoder modules are left out (modes that encode prompts once)."""
    tensors, _ = read_network_file(path)
    layers = {t.name: t.module for t in targets}
    tensors = in_target_style(tensors, layers)
    names = sorted(n for n in module_names(tensors) if text_encoder or not n.startswith("lora_te"))
    if not names:
        raise TrainTrainError(f"{Path(path).name} has no UNet modules to train in this mode.")
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise TrainTrainError(
            f"{Path(path).name} does not fit this model ({len(unknown)} unknown modules, e.g. {unknown[0]}): "
            "it was made for another model family."
        )
    adapters: dict[str, AdapterModule] = {}
    for name in names:
        kind, rank, alpha = module_kind_rank_alpha(tensors, name, Path(path).name)
        adapters[name] = ADAPTERS[kind](layers[name], rank, alpha)
    network = Network(_spec_of(adapters), adapters, {n: layers[n] for n in names})
    load_into(network, tensors)
    return network


def _spec_of(adapters: dict[str, AdapterModule]) -> NetworkSpec:
    """The network type, ranks and alphas a loaded file actually has (for its metadata when saved again)."""
    first = next(iter(adapters.values()))
    spatial = [a for a in adapters.values() if a.is_conv and a.kernel != (1, 1)]
    network_type = "loha" if first.kind == "loha" else ("c3lier" if spatial else "lierla")
    conv_rank, conv_alpha = (spatial[0].rank, float(spatial[0].alpha)) if spatial else (0, 0.0)
    return NetworkSpec(network_type, first.rank, float(first.alpha), conv_rank, conv_alpha)


def training_metadata(
    *,
    output_name: str,
    network_type: str,
    rank: int,
    alpha: float,
    conv_rank: int,
    conv_alpha: float,
    base_model_version: str,
    v_prediction: bool,
    settings: dict[str, object],
    tag_frequency: dict[str, int],
    started_at: float,
    steps: int,
) -> dict[str, str]:
    """kohya `ss_*` keys (and a few `modelspec.*`) as strings; the WebUI's Lora card shows them."""
    args: dict[str, str] = {}
    module = "networks.lora"
    if network_type == "c3lier":
        args = {"conv_dim": str(conv_rank or rank), "conv_alpha": str(conv_alpha or alpha), "algo": "locon"}
    elif network_type == "loha":
        module = "lycoris.kohya"
        args = {"algo": "loha", "conv_dim": str(conv_rank or rank), "conv_alpha": str(conv_alpha or alpha)}
    meta = {
        "ss_session_id": str(int(started_at * 1000) % 2**31),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": output_name,
        "ss_network_module": module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version == "sd_v2"),
        "ss_steps": str(steps),
        "ss_tag_frequency": json.dumps({"1": tag_frequency} if tag_frequency else {}),
        "modelspec.architecture": _architecture(base_model_version, network_type, v_prediction),
        "modelspec.title": output_name,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    meta.update({f"ss_{key}": str(value) for key, value in settings.items()})
    return meta


def _architecture(base_model_version: str, network_type: str, v_prediction: bool) -> str:
    """The modelspec architecture: SD2 is `-768-v` with v-prediction and `-512` (SD2-base) without."""
    family = {
        "sd_v1": "stable-diffusion-v1",
        "sd_v2": "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512",
        "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
    }
    suffix = "lora" if network_type != "loha" else "lycoris-loha"
    return f"{family.get(base_model_version, base_model_version)}/{suffix}"
