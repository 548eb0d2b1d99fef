"""Load a user's checkpoint offline: an A1111 single file (SD1.x / SD2.x / SDXL) or a diffusers folder.

Single files are converted with diffusers' LDM converters into models built from a local config folder (shipped in
`configs/` for the real models) and loaded strictly, so a missing or misshaped tensor is an error, never random weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from traintrain.errors import TrainTrainError
from traintrain.files import is_dir, is_file, read_json
from traintrain.models.bundle import ModelKind, Prediction
from traintrain.models.diffusers_backend import Components
from traintrain.models.ldm_convert import TEXT_ENCODER_SLOTS, UNET_PREFIX, V_PRED_KEY, VAE_PREFIX

CONFIG_ROOT = Path(__file__).parent / "configs"
SHIPPED_CONFIGS: dict[str, str] = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
TEXT_SUBFOLDERS = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
CONTEXT_WIDTHS: dict[int, ModelKind] = {768: "sd1", 1024: "sd2"}
DEFAULT_PAD = "<|endoftext|>"


def shipped_config_dir(kind: ModelKind) -> Path:
    """The diffusers config folder (no weights) shipped for the real SD1.5 / SD2.1-768-v / SDXL-base models."""
    return CONFIG_ROOT / SHIPPED_CONFIGS[kind]


def _config_folder(config_dir: Path | str | None, kind: ModelKind) -> Path:
    return Path(config_dir) if config_dir else shipped_config_dir(kind)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_kind(state_dict: Mapping[str, Any]) -> tuple[ModelKind, Prediction | None]:
    """(kind, prediction hint) of an LDM state dict (key → tensor or shape); the hint is None unless a key says."""
    hint: Prediction | None = "v" if V_PRED_KEY in state_dict else None
    if any(key.startswith("conditioner.embedders.1.") for key in state_dict):
        return "sdxl", hint
    context = [
        _shape(v)[1] for k, v in state_dict.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    ]
    if context and context[0] in CONTEXT_WIDTHS:
        return CONTEXT_WIDTHS[context[0]], hint
    has_unet = any(key.startswith(UNET_PREFIX) for key in state_dict)
    if has_unet and any(key.startswith("cond_stage_model.transformer.text_model.") for key in state_dict):
        return "sd1", hint
    if has_unet and any(key.startswith("cond_stage_model.model.transformer.") for key in state_dict):
        return "sd2", hint
    found = "a UNet" if has_unet else "no UNet"
    if context:
        found += f" with cross-attention width {context[0]}"
    prefixes = sorted({key.split(".")[0] for key in state_dict})[:6]
    raise TrainTrainError(
        f"This file is not a SD1.x, SD2.x or SDXL checkpoint: it has {len(state_dict)} tensors, {found}, no known text "
        f"encoder, top-level keys {prefixes}. Choose an A1111-style checkpoint or a diffusers folder."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .ckpt/.pt read with weights_only (never unpickling code)."""
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise TrainTrainError(
            f"{path.name}: unknown model format {suffix or '(no suffix)'!r}. "
            "Use a .safetensors or .ckpt checkpoint, or a diffusers folder with model_index.json."
        )
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise TrainTrainError(
                f"{path} is not a readable .safetensors file ({error}): choose another file."
            ) from error
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise TrainTrainError(
            f"{path} cannot be read safely ({type(error).__name__}): it holds more than tensors, or is damaged. "
            "Convert it to .safetensors with a tool you trust and choose that file."
        ) from error
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise TrainTrainError(f"{path} holds no state dict: choose a Stable Diffusion checkpoint.")
    return {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the tensors under `prefix` (keys unchanged), freeing them from `state` as components load."""
    return {key: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}


def _fit(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype) -> nn.Module:
    """Load `tensors` into a model built on the meta device; every weight must be present with the right shape."""
    expected = model.state_dict()
    # CLIP's position_ids buffer is rebuilt by the model: only some transformers versions save it, some files break it
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    missing = [k for k in expected if k not in tensors and not k.endswith("position_ids")]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{len(names)} {label} (e.g. {names[0]})"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshaped))
            if names
        ]
        raise TrainTrainError(
            f"The {what} weights do not fit the model config: {', '.join(problems)}. Choose a matching file, "
            "or a config folder for this architecture."
        )
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    return model.eval()


def _on_meta(build: Any) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, "model config")
    except TrainTrainError as error:
        raise TrainTrainError(f"{error} Choose a complete diffusers config folder.") from error
    if not isinstance(data, dict):
        raise TrainTrainError(f"{path} holds no JSON object: choose a complete diffusers config folder.")
    return data


def _load_unet(state: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _read_json(config_dir / "unet" / "config.json")
    unet = _on_meta(lambda: UNet2DConditionModel.from_config(config))
    return _fit(unet, convert_ldm_unet_checkpoint(_take(state, UNET_PREFIX), config), "UNet", dtype)


def _load_vae(tensors: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The VAE from LDM keys (with or without `first_stage_model.`), or from a diffusers-format VAE state dict."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = _read_json(config_dir / "vae" / "config.json")
    vae = _on_meta(lambda: AutoencoderKL.from_config(config))
    is_diffusers = any(".down_blocks." in key for key in tensors)
    converted = tensors if is_diffusers else convert_ldm_vae_checkpoint(tensors, config)
    return _fit(vae, converted, "VAE", dtype)


def _text_encoder_class(config_dir: Path, subfolder: str) -> type[nn.Module]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}
    index = _read_json(config_dir / "model_index.json") if (config_dir / "model_index.json").is_file() else {}
    default = "CLIPTextModelWithProjection" if subfolder == "text_encoder_2" else "CLIPTextModel"
    name = (index.get(subfolder) or [None, default])[1]
    if name not in classes:
        raise TrainTrainError(f"{config_dir}: text encoder class {name!r} is not supported; use a CLIP text encoder.")
    return classes[name]


def _load_text_encoder(
    state: dict[str, torch.Tensor], slot: int, kind: ModelKind, config_dir: Path, dtype: torch.dtype
) -> nn.Module:
    """Text encoder `slot` from its LDM keys (HF layout, or OpenCLIP with fused attention) built from the config."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    subfolder = TEXT_SUBFOLDERS[slot][0]
    cls = _text_encoder_class(config_dir, subfolder)
    config = CLIPTextConfig.from_pretrained(str(config_dir), subfolder=subfolder, local_files_only=True)
    model = _on_meta(lambda: cls(config))
    prefix, layout = TEXT_ENCODER_SLOTS[kind][slot]
    if layout == "hf":
        head = prefix + "transformer."
        converted = {k[len(head) :]: v for k, v in _take(state, head).items()}
    else:
        converted = convert_open_clip_checkpoint(model, _take(state, prefix + "model."), prefix=prefix + "model.")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return _fit(model, converted, f"text encoder {slot + 1}", dtype)


def _load_tokenizer(config_dir: Path, subfolder: str) -> Any:
    """The folder's own tokenizer when it has vocabulary files, else the real CLIP BPE with the folder's pad token."""
    from transformers import CLIPTokenizer

    from traintrain.models.tokenizer import clip_bpe_tokenizer

    folder = config_dir / subfolder
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(config_dir), subfolder=subfolder, local_files_only=True)
    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    pad = settings.get("pad_token") or DEFAULT_PAD
    return clip_bpe_tokenizer(pad["content"] if isinstance(pad, dict) else pad)


def _assemble(
    config_dir: Path, kind: ModelKind, unet: nn.Module, vae: nn.Module, encoders: list[nn.Module]
) -> Components:
    """Components with the folder's tokenizers and training schedule (alphas_cumprod, prediction type)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(_read_json(config_dir / "scheduler" / "scheduler_config.json"))
    return Components(
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=[_load_tokenizer(config_dir, TEXT_SUBFOLDERS[i][1]) for i in range(len(encoders))],
        kind=kind,
        prediction="v" if scheduler.config.prediction_type == "v_prediction" else "epsilon",
        alphas_cumprod=scheduler.alphas_cumprod.float(),
    )


def components_from_ldm(
    state: dict[str, torch.Tensor], *, config_dir: Path | str | None = None, dtype: torch.dtype = torch.float32
) -> Components:
    """Components from an LDM state dict (consumed as it loads) and a config folder, by default the shipped one for the
    detected kind. The prediction type is a `v_pred` key's; else, for SD2, the weights' own answer (`sd2_prediction`);
    else the config's scheduler's."""
    kind, hint = detect_kind(state)
    config = _config_folder(config_dir, kind)
    if not (config / "unet" / "config.json").is_file():
        raise TrainTrainError(f"{config} is not a diffusers config folder (no unet/config.json): choose another.")
    unet = _load_unet(state, config, dtype)
    vae = _load_vae(_take(state, VAE_PREFIX), config, dtype)
    encoders = [_load_text_encoder(state, slot, kind, config, dtype) for slot in range(len(TEXT_ENCODER_SLOTS[kind]))]
    components = _assemble(config, kind, unet, vae, encoders)
    if hint is None and kind == "sd2":
        hint = sd2_prediction(unet)
    components.prediction = hint or components.prediction
    return components


def sd2_prediction(unet: nn.Module) -> Prediction | None:
    """SD2 files say nothing of their prediction type: the 768-v models predict v, the 512-base ones ε. Told apart as
    the WebUI tells them apart, by the UNet's answer to a flat grey latent at the last timestep: a v-model's output
    lies far below its input (mean difference under -1), an ε-model's near it. None for weights not loaded (meta)."""
    weight = next(unet.parameters())
    if weight.is_meta:
        return None
    grey = torch.full((1, 4, 8, 8), 0.5, dtype=weight.dtype, device=weight.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out = unet(grey, torch.tensor([999], device=weight.device), encoder_hidden_states=context).sample
    return "v" if float((out.float() - grey.float()).mean()) < -1 else "epsilon"


def _folder_kind(unet_config: Mapping[str, Any], text_encoders: int) -> ModelKind:
    """SDXL with two text encoders; SD2 vs SD1 by context width, or for tiny models by SD2's linear projections."""
    if text_encoders == 2:
        return "sdxl"
    width = int(unet_config["cross_attention_dim"])
    return CONTEXT_WIDTHS.get(width, "sd2" if unet_config.get("use_linear_projection") else "sd1")


def _components_from_folder(folder: Path, dtype: torch.dtype) -> Components:
    """A diffusers pipeline folder, loaded with from_pretrained and local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def pretrained(cls: Any, subfolder: str) -> nn.Module:
        try:
            model, info = cls.from_pretrained(
                str(folder), subfolder=subfolder, local_files_only=True, torch_dtype=dtype, output_loading_info=True
            )
        except (OSError, ValueError) as error:
            raise TrainTrainError(f"Cannot load {subfolder} from {folder}: {error}") from error
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:  # e.g. a text encoder saved by transformers 5 read by 4.x (G3): would be random weights
            raise TrainTrainError(f"{folder}/{subfolder} lacks {len(missing)} weights (e.g. {missing[0]}): re-save it.")
        return model.eval()

    index = _read_json(folder / "model_index.json")
    encoders = [pretrained(_text_encoder_class(folder, sub), sub) for sub, _ in TEXT_SUBFOLDERS if sub in index]
    unet = pretrained(UNet2DConditionModel, "unet")
    return _assemble(folder, _folder_kind(unet.config, len(encoders)), unet, pretrained(AutoencoderKL, "vae"), encoders)


def load_vae_file(path: Path | str, config_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A separate VAE file (LDM keys with or without `first_stage_model.`, or diffusers keys) for `config_dir`'s VAE."""
    path = Path(path)
    if not is_file(path):
        raise TrainTrainError(f"The VAE file {path} does not exist: check the path or leave the VAE empty.")
    tensors = read_state_dict(path)
    if any(key.startswith(VAE_PREFIX) for key in tensors):
        tensors = _take(tensors, VAE_PREFIX)
    try:
        return _load_vae(tensors, config_dir, dtype)
    except TrainTrainError as error:
        raise TrainTrainError(f"The VAE {path.name} does not fit this model: {error}") from error


def load_checkpoint(
    path: Path | str,
    *,
    config_dir: Path | str | None = None,
    vae_path: Path | str | None = None,
    v_pred: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Components of a single-file checkpoint or diffusers folder, offline. `config_dir` defaults to the shipped config
    of the detected kind; `v_pred` True/False forces the prediction type, None takes a `v_pred` key or the config's."""
    path = Path(path)
    if not (is_file(path) or is_dir(path)):
        raise TrainTrainError(f"The model {path} does not exist: check the path.")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise TrainTrainError(
                f"{path} is a folder without model_index.json: choose a checkpoint file or a diffusers folder."
            )
        components, config = _components_from_folder(path, dtype), path
    else:
        components = components_from_ldm(read_state_dict(path), config_dir=config_dir, dtype=dtype)
        config = _config_folder(config_dir, components.kind)
    if vae_path:
        components.vae = load_vae_file(vae_path, config, dtype)
    if v_pred is not None:
        components.prediction = "v" if v_pred else "epsilon"
    return components
