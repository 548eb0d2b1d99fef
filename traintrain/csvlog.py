"""The CSV training log in the original's format: 8 `key,value` header rows, then
`Step,Loss,Learning Rate 1[,…],Raw Loss`, rewritten atomically.

`Loss` is the loss EMA the original wrote (weight 0.1 on each new step), `Raw Loss` the step's own loss; the raw
column comes last so that readers of the original's columns still find Step, Loss and the learning rates in place.
"""

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
EMA_WEIGHT = 0.1  # the weight of each new loss in the smoothed `Loss` column, as the original's progress bar
RAW_LOSS = "Raw Loss"


class CsvLog:
    """Rows are buffered in memory and the whole file is replaced on `flush` (never a half-written log)."""

    def __init__(self, path: Path, header: dict[str, object], lr_columns: int) -> None:
        self.path = Path(path)
        self._header = [(key, header.get(key, "")) for key in HEADER_KEYS]
        self._columns = ["Step", "Loss", *(f"Learning Rate {i + 1}" for i in range(lr_columns)), RAW_LOSS]
        self._rows: list[list[object]] = []
        self._ema: float | None = None

    def add(self, step: int, loss: float, lrs: list[float]) -> None:
        """Record one step's raw loss (the smoothed one is derived here); written at the next flush."""
        self._ema = loss if self._ema is None else (1 - EMA_WEIGHT) * self._ema + EMA_WEIGHT * loss
        self._rows.append([step, f"{self._ema:.8g}", *(f"{lr:.8g}" for lr in lrs), f"{loss:.8g}"])

    def flush(self) -> None:
        """Write everything logged so far."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(self._header)
        writer.writerow(self._columns)
        writer.writerows(self._rows)
        atomic_write_text(self.path, buffer.getvalue())
