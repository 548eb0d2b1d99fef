"""Every adapter module kind, and which one each network type trains."""

from __future__ import annotations

from traintrain.networks.dora import DoRAModule
from traintrain.networks.loha_tucker import LoHaTuckerModule
from traintrain.networks.lokr import LoKrModule
from traintrain.networks.modules import AdapterModule, LoHaModule, LoRAModule

ADAPTER_KINDS: dict[str, type[AdapterModule]] = {
    "lora": LoRAModule, "loha": LoHaModule, "loha_tucker": LoHaTuckerModule, "lokr": LoKrModule, "dora": DoRAModule,
}  # fmt: skip
KIND_OF_NETWORK_TYPE = {"lierla": "lora", "c3lier": "lora", "loha": "loha", "lokr": "lokr", "dora": "dora"}
