"""The WebUI glue: the only trainer module that imports the WebUI's `modules`, always lazily inside functions.

Jobs train the WebUI's loaded model in place (`LdmBundle`) under the WebUI's generation lock. Before: the picked
checkpoint / VAE is loaded through the WebUI's own loaders, the Lora extension's merged weights are restored,
lowvram / medvram offloading is suspended, Forge and fp8 weights are refused. After: everything is put back and
the Lora list is refreshed so the new file can be used at once (webui.md §2, §3.1, §3.4, §7).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch import nn

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelBundle
from traintrain.precision import weight_dtype
from traintrain.previews import PreviewRequest

FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
LOWVRAM_HOOK = "send_me_to_gpu"  # the forward pre-hook modules/lowvram.py puts on the offloaded modules
LORA_DIR_OPTION = "traintrain_lora_dir"
LORA_BACKUPS = ("network_weights_backup", "network_bias_backup")  # the Lora extension's copies of merged layers
FORGE_MESSAGE = (
    "TrainTrain trains the WebUI's loaded model in place, which needs AUTOMATIC1111's LDM model object (a "
    "torch.nn.Module). This is Forge / reForge, whose model (ForgeDiffusionEngine with ModelPatcher objects) is not "
    "one. Use the AUTOMATIC1111 WebUI 1.10, or TrainTrain standalone: python -m traintrain ui, with the checkpoint file."
)
WEBUI_BUSY = "The WebUI is busy (a training or a generation): make the preview when it has finished."
PREVIEW_SAMPLER = "Euler a"  # in every WebUI version
FP8_MESSAGE = (
    "The loaded model keeps its weights in fp8 (Settings > Optimizations > FP8 weight), which cannot be trained: set "
    "FP8 weight to Disable, apply, reload the checkpoint, then start the training again."
)


def is_forge() -> bool:
    """Whether this WebUI is Forge or reForge (they ship the `modules_forge` package)."""
    return importlib.util.find_spec("modules_forge") is not None


def lora_dir() -> Path:
    """Where LoRAs go: the TrainTrain setting, else the WebUI's `--lora-dir`, else `<models>/Lora`."""
    from modules import paths_internal, shared

    chosen = getattr(shared.opts, LORA_DIR_OPTION, "") or getattr(shared.cmd_opts, "lora_dir", None)
    return Path(chosen) if chosen else Path(paths_internal.models_path) / "Lora"


def checkpoint_choices() -> list[str]:
    """The WebUI's checkpoint titles, rescanned from disk; '' = the loaded model."""
    from modules import sd_models

    sd_models.list_models()
    return ["", *sd_models.checkpoint_tiles()]


def vae_choices() -> list[str]:
    """The WebUI's VAE names, rescanned from disk; '' = the VAE as loaded."""
    from modules import sd_vae

    sd_vae.refresh_vae_list()
    return ["", *sd_vae.vae_dict]


def lora_extension() -> ModuleType | None:
    """The built-in Lora extension's `networks` module, when the WebUI has loaded it."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "loaded_networks") else None


def refresh_lora_list() -> None:
    """Rescan the Lora folders so new files can be used in prompts (the cards need the page's refresh button)."""
    networks = lora_extension()
    if networks is not None:
        networks.list_available_networks()


def restore_lora_weights(sd_model: nn.Module) -> None:
    """Undo the Lora extension's in-place merge: clean weights back from its backups, its caches and list cleared."""
    networks = lora_extension()
    if networks is None:
        return
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in sd_model.modules():
            if any(getattr(module, name, None) is not None for name in LORA_BACKUPS):
                networks.network_restore_weights_from_backup(module)
                networks.network_reset_cached_weight(module)


def refuse_unsupported(sd_model: Any) -> None:
    """Refuse models that cannot be trained in place: Forge's engine objects and fp8-stored weights."""
    if not isinstance(sd_model, nn.Module):
        raise TrainTrainError(FORGE_MESSAGE)
    if any(parameter.dtype in FP8 for parameter in sd_model.parameters()):
        raise TrainTrainError(FP8_MESSAGE)


@contextlib.contextmanager
def lowvram_suspended(sd_model: nn.Module) -> Iterator[None]:
    """Under --lowvram / --medvram: everything back on the CPU and the offloading hooks and VAE wrappers taken off,
    so the bundle can place the model itself; afterwards hooks and wrappers return and nothing counts as on the GPU."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    from modules import lowvram

    lowvram.send_everything_to_cpu()
    hooked = []
    for module in sd_model.modules():
        hooks = module._forward_pre_hooks
        ours = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") == LOWVRAM_HOOK]
        if ours:
            hooked.append((module, dict(hooks)))
            for key in ours:
                del hooks[key]
    vae = sd_model.first_stage_model
    wrappers = {name: vae.__dict__.pop(name) for name in ("encode", "decode") if name in vae.__dict__}
    try:
        yield
    finally:
        vae.__dict__.update(wrappers)
        for module, hooks in hooked:
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks.update(hooks)
        lowvram.module_in_gpu = None


@contextlib.contextmanager
def checkpoint_loaded(name: str) -> Iterator[Any]:
    """The WebUI's model with checkpoint `name` loaded by the WebUI ('' = as loaded); the previous one comes back."""
    from modules import sd_models, shared

    current = shared.sd_model
    if not name:
        yield current
        return
    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise TrainTrainError(f"Checkpoint {name!r} is not in the WebUI's list: pick one from the model list.")
    previous = getattr(current, "sd_checkpoint_info", None)
    if previous is not None and previous.filename == info.filename:
        yield current
        return
    sd_models.reload_model_weights(info=info)
    try:
        yield shared.sd_model
    finally:
        if previous is not None:
            sd_models.reload_model_weights(info=previous)


@contextlib.contextmanager
def vae_loaded(sd_model: Any, name: str) -> Iterator[None]:
    """The WebUI's VAE `name` loaded by the WebUI for the duration ('' = as loaded); the previous one comes back."""
    if not name:
        yield
        return
    from modules import sd_vae

    path = sd_vae.vae_dict.get(name)
    if path is None:
        raise TrainTrainError(f"VAE {name!r} is not in the WebUI's VAE list: pick one from the VAE list.")
    previous = sd_vae.loaded_vae_file
    sd_vae.reload_vae_weights(sd_model, vae_file=path)
    try:
        yield
    finally:
        sd_vae.reload_vae_weights(sd_model, vae_file=previous)


def _model_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The UNet / text-encoder dtype while training: 'model' keeps the WebUI's (fp32 on the CPU)."""
    if config.train_model_precision == "model" and device.type != "cpu":
        return None
    return weight_dtype(config.train_model_precision, device)


@contextlib.contextmanager
def interrupt_watched(on_interrupt: Callable[[], object] | None, poll_seconds: float = 0.25) -> Iterator[None]:
    """While a job runs, show it as the WebUI's current job and call `on_interrupt` once when its Interrupt is pressed."""
    from modules import shared

    state = shared.state
    state.begin(job="TrainTrain")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_seconds):
            if state.interrupted:
                if on_interrupt is not None:
                    on_interrupt()
                return

    watcher = threading.Thread(target=watch, name="traintrain-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        state.end()


class WebUIModelProvider:
    """The job queue's ModelProvider inside the WebUI: the loaded (or picked) model, trained in place.

    The WebUI's generation lock is held for the whole job, so no image is generated while the weights are in use; the
    WebUI's Interrupt button calls `on_interrupt` (the queue's stop, saving as the job's 'save on stop' says).
    """

    def __init__(self, on_interrupt: Callable[[], object] | None = None) -> None:
        self.on_interrupt = on_interrupt

    @contextlib.contextmanager
    def open(self, config: TrainConfig) -> Iterator[ModelBundle]:
        """The bundle over the WebUI's model for `config`; afterwards the model is as before and the Lora list fresh."""
        from modules import call_queue, devices

        from traintrain.models.ldm_bundle import LdmBundle

        device = torch.device(devices.device)
        vae_dtype = weight_dtype(config.train_VAE_precision, device)
        with call_queue.queue_lock, interrupt_watched(self.on_interrupt):
            if is_forge():
                raise TrainTrainError(FORGE_MESSAGE)
            try:
                with checkpoint_loaded(config.model) as sd_model, vae_loaded(sd_model, config.vae):
                    refuse_unsupported(sd_model)
                    restore_lora_weights(sd_model)
                    with lowvram_suspended(sd_model):
                        bundle = LdmBundle(sd_model, device, _model_dtype(config, device), vae_dtype=vae_dtype)
                        if config.model_v_pred:
                            bundle.prediction = "v"
                        yield bundle
            finally:
                refresh_lora_list()

    def preview(self, config: TrainConfig, requests: list[PreviewRequest]) -> list[Image.Image]:
        """iLECO previews through the WebUI's txt2img pipeline with the loaded model (its sampler, `<lora:…>` in the
        prompts, saved to the txt2img folder); refused while a training or a generation holds the model."""
        from modules import call_queue, shared

        if not call_queue.queue_lock.acquire(blocking=False):
            raise TrainTrainError(WEBUI_BUSY)
        try:
            shared.state.begin(job="TrainTrain preview")
            try:
                return [txt2img(request) for request in requests]
            finally:
                shared.state.end()
        finally:
            call_queue.queue_lock.release()


def txt2img(request: PreviewRequest) -> Image.Image:
    """One image from the WebUI's txt2img processing with the loaded model, saved as txt2img saves its images."""
    from modules import processing, shared

    opts = shared.opts
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        outpath_samples=opts.outdir_samples or opts.outdir_txt2img_samples,
        outpath_grids=opts.outdir_grids or opts.outdir_txt2img_grids,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed,
        sampler_name=PREVIEW_SAMPLER,
        batch_size=1,
        n_iter=1,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        width=request.width,
        height=request.height,
    )
    with contextlib.closing(p):
        processed = processing.process_images(p)
    if not processed.images:
        raise TrainTrainError("The WebUI made no preview image (interrupted?): try again.")
    return processed.images[0]
