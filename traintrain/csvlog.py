"""The CSV training log: 8 `key,value` header rows, then `Step,Loss,Learning Rate 1[,…]`, rewritten atomically."""

from __future__ import annotations

import io
import csv
from pathlib import Path

from traintrain.files import atomic_write_text

HEADER_KEYS = (
    "network_rank",
    "network_alpha",
    "train_learning_rate",
    "train_iterations",
    "train_lr_scheduler",
    "model_version",
    "train_optimizer",
    "save_lora_name",
)


class CsvLog:
    """Rows are buffered in memory and the whole file is replaced on `flush` (never a half-written log)."""

    def __init__(self, path: Path, header: dict[str, object], lr_columns: int) -> None:
        self.path = Path(path)
        self._header = [(key, header.get(key, "")) for key in HEADER_KEYS]
        self._columns = ["Step", "Loss"] + [f"Learning Rate {i + 1}" for i in range(lr_columns)]
        self._rows: list[list[object]] = []

    def add(self, step: int, loss: float, lrs: list[float]) -> None:
        """Record one step (written at the next flush)."""
        self._rows.append([step, f"{loss:.8g}", *(f"{lr:.8g}" for lr in lrs)])

    def flush(self) -> None:
        """Write everything logged so far."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(self._header)
        writer.writerow(self._columns)
        writer.writerows(self._rows)
        atomic_write_text(self.path, buffer.getvalue())
