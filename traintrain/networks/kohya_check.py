"""Checks of a LoRA file's tensors before they become a network: every module's keys, shapes, dtypes and values."""

from __future__ import annotations

import math

import torch

from traintrain.errors import TrainTrainError

LORA_KEYS = ("lora_down.weight", "lora_up.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def module_kind_rank_alpha(tensors: dict[str, torch.Tensor], name: str, file_name: str) -> tuple[str, int, float]:
    """(adapter kind 'lora'|'loha', rank, alpha) of module `name`, after checking each of its tensors; no alpha
    means alpha = rank. Anything malformed is a TrainTrainError naming the file, the module and what is wrong."""
    own = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.split(".", 1)[0] == name and "." in key}
    kind = "loha" if "hada_w1_a" in own else "lora"
    weights = LOHA_KEYS if kind == "loha" else LORA_KEYS
    extra = sorted(set(own) - {*weights, "alpha"})
    missing = [key for key in weights if key not in own]
    where = f"{file_name}, module {name}"
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"has weights this trainer cannot load ({', '.join(extra)})"
        raise TrainTrainError(f"{where} {what}: choose a LierLa, C3Lier/LoCon or LoHa file in kohya format.")
    for key, value in own.items():
        _check_values(value, f"{where}: {key}")
    rank = _lora_rank(own, where) if kind == "lora" else _loha_rank(own, where)
    return kind, rank, _alpha(own.get("alpha"), rank, where)


def _check_values(value: torch.Tensor, where: str) -> None:
    if not value.is_floating_point():
        raise TrainTrainError(f"{where} holds {value.dtype} values, not floating-point weights: the file is damaged.")
    if not bool(torch.isfinite(value.float()).all()):
        raise TrainTrainError(f"{where} holds NaN or infinite values: the file is damaged, use an earlier save.")


def _lora_rank(own: dict[str, torch.Tensor], where: str) -> int:
    down, up = own["lora_down.weight"], own["lora_up.weight"]
    conv = down.dim() == 4
    shapes_ok = down.dim() in (2, 4) and up.dim() == down.dim() and (not conv or tuple(up.shape[2:]) == (1, 1))
    if not shapes_ok or down.shape[0] < 1 or up.shape[1] != down.shape[0] or 0 in down.shape or 0 in up.shape:
        raise TrainTrainError(
            f"{where}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not a rank-r pair "
            "((r, in) and (out, r), or 4-D for convolutions with a rank of at least 1): the file is damaged."
        )
    return int(down.shape[0])


def _loha_rank(own: dict[str, torch.Tensor], where: str) -> int:
    w1a, w1b, w2a, w2b = (own[key] for key in LOHA_KEYS)
    rank = w1a.shape[1] if w1a.dim() == 2 else 0
    shapes_ok = (
        w1a.dim() == 2 and w2a.shape == w1a.shape and w1b.dim() in (2, 4) and w2b.shape == w1b.shape
        and w1b.shape[0] == rank and rank >= 1 and 0 not in w1a.shape and 0 not in w1b.shape
    )  # fmt: skip
    if not shapes_ok:
        shapes = ", ".join(f"{key} {tuple(own[key].shape)}" for key in LOHA_KEYS)
        raise TrainTrainError(
            f"{where}: {shapes} are not LoHa factors ((out, r) and (r, in) pairs with one rank of at least 1): "
            "the file is damaged."
        )
    return int(rank)


def _alpha(alpha: torch.Tensor | None, rank: int, where: str) -> float:
    if alpha is None:
        return float(rank)
    if alpha.numel() != 1:
        raise TrainTrainError(f"{where}: alpha has {alpha.numel()} values instead of one: the file is damaged.")
    value = float(alpha.reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise TrainTrainError(f"{where}: alpha is {value}, it must be above 0: the file is damaged.")
    return value
