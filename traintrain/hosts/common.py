"""What every WebUI host shares (AUTOMATIC1111, Forge, Forge Neo, reForge): folders and lists, the generation lock
with the host's Interrupt, the Lora list refresh and previews through the host's txt2img (webui.md §2, §3.4;
forge.md §1.3, §3, §4). Host modules (`modules.*`) are imported lazily inside functions."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, ContextManager, Iterator

from PIL import Image

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.models.bundle import ModelBundle
from traintrain.previews import PreviewRequest

LORA_DIR_OPTION = "traintrain_lora_dir"
WEBUI_BUSY = "The WebUI is busy (a training or a generation): make the preview when it has finished."
PREVIEW_SAMPLER = "Euler a"  # in every WebUI version and Forge
JOB_TITLE = "TrainTrain"


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


def checkpoint_info(name: str) -> object:
    """The host's CheckpointInfo for a title of the model list; a name not in the list is refused."""
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise TrainTrainError(f"Checkpoint {name!r} is not in the WebUI's list: pick one from the model list.")
    return info


def vae_file(name: str) -> str:
    """The file of a VAE of the host's VAE list; a name not in the list is refused."""
    from modules import sd_vae

    path = sd_vae.vae_dict.get(name)
    if path is None:
        raise TrainTrainError(f"VAE {name!r} is not in the WebUI's VAE list: pick one from the VAE list.")
    return path


def lora_extension() -> ModuleType | None:
    """The built-in Lora extension's `networks` module (A1111 / reForge `Lora`, Forge `sd_forge_lora`), when loaded."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "loaded_networks") else None


def refresh_lora_list() -> None:
    """Rescan the Lora folders so new files can be used in prompts (the cards need the page's refresh button)."""
    networks = lora_extension()
    if networks is not None:
        networks.list_available_networks()


@contextlib.contextmanager
def interrupt_watched(on_interrupt: Callable[[], object] | None, poll_seconds: float = 0.25) -> Iterator[None]:
    """While a job runs, show it as the WebUI's current job and call `on_interrupt` once when its Interrupt is pressed."""
    from modules import shared

    state = shared.state
    state.begin(job=JOB_TITLE)
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


class HostModelProvider:
    """The job queue's ModelProvider inside a WebUI host: a job holds the host's generation lock (`queue_lock`, the
    one serializer of every host) and shows as its current job, whose Interrupt calls `on_interrupt` (the queue's
    stop, saving as the job's 'save on stop' says); afterwards the Lora list is refreshed. Hosts give `model_for`."""

    def __init__(self, on_interrupt: Callable[[], object] | None = None) -> None:
        self.on_interrupt = on_interrupt

    def model_for(self, config: TrainConfig) -> ContextManager[ModelBundle]:
        """The host's way to a trainable bundle for `config`, called with the lock held."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open(self, config: TrainConfig) -> Iterator[ModelBundle]:
        """The bundle for `config` under the host's lock; afterwards the host's model is as before, the Lora list fresh."""
        from modules import call_queue

        with call_queue.queue_lock, interrupt_watched(self.on_interrupt):
            try:
                with self.model_for(config) as bundle:
                    yield bundle
            finally:
                refresh_lora_list()

    def preview(self, config: TrainConfig, requests: list[PreviewRequest]) -> list[Image.Image]:
        """iLECO previews through the host's txt2img pipeline with its loaded model (its sampler, `<lora:…>` in the
        prompts, saved to the txt2img folder); refused while a training or a generation holds the model."""
        from modules import call_queue, shared

        if not call_queue.queue_lock.acquire(blocking=False):
            raise TrainTrainError(WEBUI_BUSY)
        try:
            shared.state.begin(job=f"{JOB_TITLE} preview")
            try:
                return [txt2img(request) for request in requests]
            finally:
                shared.state.end()
        finally:
            call_queue.queue_lock.release()


def txt2img(request: PreviewRequest) -> Image.Image:
    """One image from the host's txt2img processing with the loaded model, saved as txt2img saves its images."""
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
