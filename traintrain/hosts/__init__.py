"""The WebUI hosts TrainTrain runs in, behind one small interface the tab and the job queue use.

| host | module | how a job gets its model |
| --- | --- | --- |
| AUTOMATIC1111 1.10 | `a1111.py` | the loaded LDM model, trained in place |
| reForge | `reforge.py` | as AUTOMATIC1111, after ldm_patched unloaded its patches; inference tensors replaced |
| Forge (main), Forge Neo | `forge.py` | a copy loaded from the checkpoint file while Forge's model is off the device |

Only this package (and `scripts/`) imports host code (`modules`, `backend`, `modules_forge`, `ldm_patched`), always
inside functions. The host is told by what it offers, never by version strings (forge.md §8).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from traintrain.hosts import common
from traintrain.hosts.common import LORA_DIR_OPTION, HostModelProvider

__all__ = ["LORA_DIR_OPTION", "Host", "detect_host"]


@dataclass(frozen=True)
class Host:
    """One WebUI host: its name and its ModelProvider; the lists, the Lora folder and its refresh are the WebUI's."""

    name: str
    provider_class: type[HostModelProvider]

    def provider(self, on_interrupt: Callable[[], object] | None = None) -> HostModelProvider:
        """The job queue's ModelProvider (jobs under the host's lock; its Interrupt calls `on_interrupt`; previews)."""
        return self.provider_class(on_interrupt)

    @staticmethod
    def model_choices() -> list[str]:
        """The checkpoint titles for the model dropdown ('' = the loaded model)."""
        return common.checkpoint_choices()

    @staticmethod
    def vae_choices() -> list[str]:
        """The VAE names for the VAE dropdown ('' = as loaded)."""
        return common.vae_choices()

    @staticmethod
    def lora_dir() -> Path:
        """The folder trained LoRAs go to."""
        return common.lora_dir()

    @staticmethod
    def refresh_lora_list() -> None:
        """Rescan the host's Lora folders."""
        common.refresh_lora_list()


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module in sys.modules without a spec, or a broken parent package
        return False


def _forge_name() -> str:
    """'Forge Neo' when `modules_forge.forge_version` says so, else 'Forge'."""
    try:
        from modules_forge import forge_version
    except ImportError:
        return "Forge"
    return "Forge Neo" if str(getattr(forge_version, "version", "")).lower().startswith("neo") else "Forge"


def detect_host() -> Host:
    """The running host by capability: `sd_models.forge_model_reload` → Forge / Forge Neo; `ldm_patched` without it
    → reForge; else AUTOMATIC1111."""
    from modules import sd_models

    if hasattr(sd_models, "forge_model_reload"):
        from traintrain.hosts.forge import ForgeModelProvider

        return Host(_forge_name(), ForgeModelProvider)
    if _module_available("ldm_patched"):
        from traintrain.hosts.reforge import ReForgeModelProvider

        return Host("reForge", ReForgeModelProvider)
    from traintrain.hosts.a1111 import A1111ModelProvider

    return Host("AUTOMATIC1111", A1111ModelProvider)
