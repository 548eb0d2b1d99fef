"""Which files a Forge / Forge Neo job trains from, and what such a file must be (forge.md §2.1, §2.3).

The checkpoint is the picked one, else the one of Forge's model dropdown (loaded, or loaded by its next generation);
the VAE is the picked one, else the
VAE of Forge's "VAE / Text Encoder" choice. Files the project's loader cannot train (GGUF, pre-quantized nf4 / fp4,
fp8-only weights, Flux / Z-Image and other DiT models, separate text encoders) are refused with what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.hosts.common import checkpoint_info, vae_file
from traintrain.models.checkpoint import detect_kind

# Forge engine classes (backend.diffusion_engine) of the models TrainTrain trains (SD1, SD2, SDXL).
ENGINES = ("StableDiffusion", "StableDiffusion2", "StableDiffusionXL")
QUANT_KEYS = (".absmax", ".quant_map", ".quant_state", "bitsandbytes__")  # bitsandbytes nf4 / fp4 tensors
DIT_KEYS = {  # a key part only these diffusion transformers have → the model's name
    "double_blocks.": "Flux",
    "context_refiner.": "Z-Image",
    "joint_blocks.": "SD3",
    "transformer_blocks.0.img_mod": "Qwen-Image",
}
VAE_KEYS = ("decoder.conv_in.", "first_stage_model.decoder.", "decoder.up_blocks.", "decoder.up.")
UNSUPPORTED_MODEL = (
    "Forge has a {what} model loaded: TrainTrain trains SD1, SD2 and SDXL checkpoints. Pick one in TrainTrain's "
    "model list (or load one in Forge) and start again."
)
GGUF_MESSAGE = (
    "{name} is a GGUF file, whose quantized weights cannot be trained. Pick the fp16 / bf16 / fp32 .safetensors of "
    "the same model in TrainTrain's model list."
)
QUANTIZED_MESSAGE = (
    "{name} holds pre-quantized {what} weights, which cannot be trained. Pick the fp16 / bf16 / fp32 .safetensors of "
    "the same model in TrainTrain's model list."
)
TEXT_ENCODER_MESSAGE = (
    "Forge's 'VAE / Text Encoder' choice holds {name}, which is not a VAE: TrainTrain trains with the checkpoint's own "
    "text encoders. Remove the text encoder from that choice (or pick a VAE in TrainTrain's VAE list) and start again."
)
NO_CHECKPOINT = "Forge has no checkpoint selected: pick one in TrainTrain's model list (or in Forge) and start again."


@dataclass(frozen=True)
class TrainingFiles:
    """The checkpoint (and separate VAE) a Forge job loads, and the diffusers config folder to build it from (None:
    the shipped SD1.5 / SD2.1 / SDXL one of its kind)."""

    checkpoint: Path
    vae: Path | None
    config_dir: Path | None


def _safetensors_layout(path: Path) -> dict[str, tuple[str, list[int]]] | None:
    """key → (dtype name, shape) of a .safetensors file without reading its tensors; None for other formats."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {
                key: (handle.get_slice(key).get_dtype(), handle.get_slice(key).get_shape()) for key in handle.keys()
            }
    except (SafetensorError, OSError) as error:
        raise TrainTrainError(f"{path} is not a readable .safetensors file ({error}): choose another file.") from error


def refuse_untrainable(path: Path) -> None:
    """Refuse GGUF, quantized, DiT and other non-SD checkpoint files from their header (.ckpt files: the loader
    decides when it reads them)."""
    if path.suffix.lower() == ".gguf":
        raise TrainTrainError(GGUF_MESSAGE.format(name=path.name))
    layout = _safetensors_layout(path)
    if layout is None:
        return
    if any(any(marker in key for marker in QUANT_KEYS) for key in layout):
        raise TrainTrainError(QUANTIZED_MESSAGE.format(name=path.name, what="nf4 / fp4 (bitsandbytes)"))
    if any(dtype.startswith("F8") for dtype, _ in layout.values()):
        raise TrainTrainError(QUANTIZED_MESSAGE.format(name=path.name, what="fp8"))
    for marker, what in DIT_KEYS.items():
        if any(marker in key for key in layout):
            raise TrainTrainError(UNSUPPORTED_MODEL.format(what=what))
    detect_kind({key: shape for key, (_, shape) in layout.items()})


def config_folder(checkpoint: Path) -> Path | None:
    """A diffusers config folder beside the checkpoint, named like it without its suffix (for checkpoints whose sizes
    differ from SD1.5 / SD2.1 / SDXL); None: the shipped config of its kind."""
    folder = checkpoint.with_suffix("")
    return folder if (folder / "unet" / "config.json").is_file() else None


def _is_vae_file(path: Path) -> bool:
    """Whether a file of Forge's additional modules is a VAE (it has a decoder); .ckpt / .pt files count as VAEs."""
    if path.suffix.lower() == ".gguf":  # quantized text encoders (T5, Qwen3)
        return False
    layout = _safetensors_layout(path)
    return layout is None or any(key.startswith(VAE_KEYS) for key in layout)


def selected_checkpoint_file() -> Path:
    """The checkpoint of Forge's model dropdown (the one its next generation uses, loaded or not), else the loaded
    one, else Forge's default pick; a loaded DiT engine of that file is refused by its class."""
    from modules import sd_models, shared

    parameters = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
    engine = shared.sd_model
    loaded = getattr(engine, "sd_checkpoint_info", None)
    info = parameters.get("checkpoint_info") or loaded
    if info is None:
        try:
            info = sd_models.select_checkpoint()
        except FileNotFoundError as error:  # the A1111 code Forge keeps raises this when the folder is empty
            raise TrainTrainError(NO_CHECKPOINT) from error
    if info is None:
        raise TrainTrainError(NO_CHECKPOINT)
    engine_class = type(engine).__name__
    if loaded is not None and loaded.filename == info.filename and engine_class not in ENGINES:
        raise TrainTrainError(UNSUPPORTED_MODEL.format(what=engine_class))
    return Path(info.filename)


def forge_vae_file() -> Path | None:
    """The VAE of Forge's 'VAE / Text Encoder' choice (`opts.forge_additional_modules`); text encoders are refused."""
    from modules import shared

    chosen = [Path(path) for path in getattr(shared.opts, "forge_additional_modules", None) or []]
    for path in chosen:
        if not _is_vae_file(path):
            raise TrainTrainError(TEXT_ENCODER_MESSAGE.format(name=path.name))
    return chosen[0] if chosen else None


def training_files(config: TrainConfig) -> TrainingFiles:
    """The files a Forge job for `config` loads: its picks from TrainTrain's lists, else what Forge uses."""
    checkpoint = Path(checkpoint_info(config.model).filename) if config.model else selected_checkpoint_file()
    vae = Path(vae_file(config.vae)) if config.vae else forge_vae_file()
    refuse_untrainable(checkpoint)
    return TrainingFiles(checkpoint, vae, config_folder(checkpoint))
