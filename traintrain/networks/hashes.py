"""The hashes kohya writes into a LoRA's metadata and the WebUI's Lora card / civitai tools read.

- `sshs_model_hash`: sha256 of a safetensors file's tensor data (the bytes after its JSON header);
- `sshs_legacy_hash`: the WebUI's old short hash, sha256 of 64 KiB at offset 1 MiB, first 8 hex digits;
both computed on the file as saved with only its `ss_*` metadata (so editing other metadata keeps them valid).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from safetensors.torch import save

LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


def legacy_hash(data: bytes) -> str:
    """The WebUI's old model hash of a file's bytes (also kohya's `ss_sd_model_hash` of the base model)."""
    return hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]


def legacy_file_hash(path: Path) -> str:
    """`legacy_hash` of a file, reading only the 64 KiB it covers."""
    with open(path, "rb") as file:
        file.seek(LEGACY_OFFSET)
        return hashlib.sha256(file.read(LEGACY_LENGTH)).hexdigest()[:8]


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash` of the file these tensors and `metadata` make."""
    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = struct.unpack("<Q", data[:8])[0]
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header_length :]).hexdigest(),
        "sshs_legacy_hash": legacy_hash(data),
    }
