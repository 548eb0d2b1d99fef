"""Stand-ins for the Forge / Forge Neo APIs the Forge host uses, shaped as forge.md documents them (§1.3, §2, §3, §4).

`modules.*` (`shared` with the engine, opts, state; `sd_models` with `forge_model_reload`, `model_data`,
`select_checkpoint`; `call_queue.queue_lock`; `devices`; `sd_vae`; `processing`), `backend.memory_management` and
`modules_forge.forge_version`, installed in `sys.modules`. The engine is a `ForgeDiffusionEngine` (not an nn.Module)
whose `forge_objects` hold the checkpoint's networks built under `torch.inference_mode()` (inference tensors, as
Forge's loader makes them); its UNet patcher has a LoRA merged in place that unloading takes off, as Forge's
`ModelPatcher.unpatch_model` does.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from host_fakes import FakeState
from torch import nn

OPTS = dict(outdir_samples="", outdir_txt2img_samples="outputs/txt2img", outdir_grids="", outdir_txt2img_grids="g")
PATCHED_KEY = "diffusion_model.input_blocks.0.0.weight"  # the KModel weight a merged LoRA changed


class ForgeDiffusionEngine:
    """backend.diffusion_engine.base.ForgeDiffusionEngine: a plain object, not an nn.Module."""

    is_sd1 = is_sdxl = False

    def __init__(self, forge_objects: SimpleNamespace, checkpoint_info: SimpleNamespace) -> None:
        self.forge_objects = forge_objects
        self.forge_objects_original = forge_objects
        self.forge_objects_after_applying_lora = forge_objects
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = checkpoint_info


class StableDiffusion(ForgeDiffusionEngine):
    is_sd1 = True


class StableDiffusion2(ForgeDiffusionEngine):
    pass


class StableDiffusionXL(ForgeDiffusionEngine):
    is_sdxl = True


class Flux(ForgeDiffusionEngine):
    pass


def module_from_tensors(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An nn.Module tree whose parameters are `tensors` under their dotted names (ldm names, as Forge's modules)."""
    root = nn.Module()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


class ModelPatcher:
    """backend.patcher.base.ModelPatcher: `.model`, and the backups of weights merged in place (`unpatch_model`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def merge_lora(self, key: str, delta: float) -> None:
        """What a generation with `<lora:…>` does: the weight changed in place, the clean one kept as a backup."""
        weight = self.model.get_parameter(key)
        self.backup[key] = weight.clone()
        weight.add_(delta)

    @torch.inference_mode()
    def unpatch_model(self) -> None:
        for key, clean in self.backup.items():
            self.model.get_parameter(key).copy_(clean)
        self.backup.clear()


@torch.inference_mode()
def forge_engine(checkpoint: Path, engine_class: type[ForgeDiffusionEngine] = StableDiffusion) -> ForgeDiffusionEngine:
    """The engine Forge's `forge_loader` builds from a checkpoint file, under inference mode."""
    tensors = load_file(str(checkpoint))

    def part(prefix: str) -> nn.Module:
        return module_from_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    text = "conditioner." if any(k.startswith("conditioner.") for k in tensors) else "cond_stage_model."
    kmodel = nn.Module()
    kmodel.diffusion_model = part("model.diffusion_model.")
    kmodel.storage_dtype = kmodel.computation_dtype = torch.float32
    objects = SimpleNamespace(
        unet=ModelPatcher(kmodel),
        clip=SimpleNamespace(cond_stage_model=part(text)),
        vae=SimpleNamespace(first_stage_model=part("first_stage_model.")),
        clipvision=None,
    )
    return engine_class(objects, SimpleNamespace(filename=str(checkpoint), title=checkpoint.name))


class FakeForge:
    """Forge's modules around `engine`, recording what the host module asks of them (`calls`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, engine: ForgeDiffusionEngine, tmp: Path, neo: bool) -> None:
        self.calls: list[tuple] = []
        self.queue_lock = threading.Lock()
        self.engine = engine
        self.checkpoints = {f"{Path(engine.sd_checkpoint_info.filename).name} [abcd]": engine.sd_checkpoint_info}
        self.model_data = SimpleNamespace(
            sd_model=engine,
            forge_hash="{'checkpoint_info': …}",
            forge_loading_parameters={"checkpoint_info": engine.sd_checkpoint_info, "additional_modules": []},
        )
        self.install(
            monkeypatch,
            "modules",
            {
                "call_queue": dict(queue_lock=self.queue_lock),
                "devices": dict(device=torch.device("cpu"), dtype_unet=torch.float32),
                "shared": dict(
                    sd_model=engine,
                    opts=SimpleNamespace(**OPTS, forge_additional_modules=[]),
                    cmd_opts=SimpleNamespace(lora_dir=str(tmp / "Lora")),
                    state=FakeState(),
                ),
                "paths_internal": dict(models_path=str(tmp / "models")),
                "sd_models": dict(
                    model_data=self.model_data,
                    forge_model_reload=self.forge_model_reload,
                    select_checkpoint=lambda: engine.sd_checkpoint_info,
                    get_closet_checkpoint_match=self.checkpoints.get,
                    list_models=lambda: self.calls.append(("list_models",)),
                    checkpoint_tiles=lambda: list(self.checkpoints),
                ),
                "sd_vae": dict(vae_dict={}, refresh_vae_list=lambda: self.calls.append(("refresh_vae_list",))),
                "processing": dict(StableDiffusionProcessingTxt2Img=self.txt2img, process_images=self.process_images),
            },
        )
        self.install(
            monkeypatch,
            "backend",
            {
                "memory_management": dict(
                    unload_all_models=self.unload_all_models,
                    soft_empty_cache=lambda force=False: self.calls.append(("soft_empty_cache",)),
                    get_torch_device=lambda: torch.device("cpu"),
                ),
            },
        )
        self.install(monkeypatch, "modules_forge", {"forge_version": dict(version="neo" if neo else "2.0.1v1.10.1")})
        networks = types.ModuleType("networks")
        networks.loaded_networks = []
        networks.list_available_networks = lambda: self.calls.append(("list_available_networks",))
        monkeypatch.setitem(sys.modules, "networks", networks)

    @staticmethod
    def install(monkeypatch: pytest.MonkeyPatch, package_name: str, parts: dict[str, dict]) -> None:
        package = types.ModuleType(package_name)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, package_name, package)
        for name, attributes in parts.items():
            module = types.ModuleType(f"{package_name}.{name}")
            module.__dict__.update(attributes)
            setattr(package, name, module)
            monkeypatch.setitem(sys.modules, f"{package_name}.{name}", module)

    @property
    def shared(self) -> types.ModuleType:
        return sys.modules["modules.shared"]

    @property
    def sd_models(self) -> types.ModuleType:
        return sys.modules["modules.sd_models"]

    @property
    def sd_vae(self) -> types.ModuleType:
        return sys.modules["modules.sd_vae"]

    @property
    def state(self) -> FakeState:
        return self.shared.state

    def unload_all_models(self) -> None:
        """memory_management.unload_all_models: every loaded patcher unpatched (merged LoRAs off), moved off the GPU."""
        self.calls.append(("unload_all_models",))
        self.engine.forge_objects.unet.unpatch_model()

    def forge_model_reload(self) -> tuple[ForgeDiffusionEngine, bool]:
        self.calls.append(("forge_model_reload",))
        return self.model_data.sd_model, False

    def txt2img(self, **settings) -> SimpleNamespace:
        return SimpleNamespace(**settings, close=lambda: self.calls.append(("close",)))

    def process_images(self, p) -> SimpleNamespace:
        self.calls.append(("process_images", p.prompt, p.sd_model is self.engine, self.locked_elsewhere()))
        return SimpleNamespace(images=[Image.new("RGB", (p.width, p.height))])

    def locked_elsewhere(self) -> bool:
        """Whether another thread (a generation) would have to wait for the lock now."""
        result = []
        thread = threading.Thread(target=lambda: result.append(self.queue_lock.acquire(timeout=0.01)))
        thread.start()
        thread.join()
        if result[0]:
            self.queue_lock.release()
        return not result[0]


def engine_tensors(engine: ForgeDiffusionEngine) -> dict[str, torch.Tensor]:
    """Every weight of the engine's networks, by part."""
    objects = engine.forge_objects
    parts = {"unet": objects.unet.model, "clip": objects.clip.cond_stage_model, "vae": objects.vae.first_stage_model}
    return {f"{name}.{key}": value for name, module in parts.items() for key, value in module.state_dict().items()}
