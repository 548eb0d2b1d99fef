"""CSV training log (the `traintrain.csvlog` format, or the original's) → matplotlib figure: the smoothed loss (and the
raw loss where logged) and the learning rates against steps."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from traintrain.csvlog import RAW_LOSS
from traintrain.errors import TrainTrainError
from traintrain.files import plain_name


@dataclass
class TrainingLog:
    """A parsed CSV log: the `key,value` header rows and the per-step table (Step, Loss, Learning Rate 1…)."""

    path: Path
    header: dict[str, str]
    table: pd.DataFrame


def find_log(logs_dir: Path, name: str = "") -> Path:
    """The CSV log `name` (".csv" optional) inside `logs_dir`, or the newest one there when `name` is blank."""
    logs_dir = Path(logs_dir)
    name = name.strip()
    if not name:
        logs = [p for p in logs_dir.rglob("*.csv") if p.is_file()] if logs_dir.is_dir() else []
        if not logs:
            raise TrainTrainError(f"No CSV log in {logs_dir}: tick 'logging save csv' and train first.")
        return max(logs, key=lambda p: p.stat().st_mtime)
    plain_name(name, f"give the name of a CSV file in {logs_dir}.")
    file_name = name if name.lower().endswith(".csv") else f"{name}.csv"
    matches = sorted(logs_dir.rglob(file_name)) if logs_dir.is_dir() else []
    if not matches:
        raise TrainTrainError(f"No log named {file_name} in {logs_dir}: leave the name blank for the newest log.")
    return matches[0]


def read_log(path: Path) -> TrainingLog:
    """Parse a CSV log; the table starts at the row whose first cell is 'Step'."""
    try:
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8").splitlines()))
    except OSError as error:
        raise TrainTrainError(f"Cannot read {path}: {error.strerror or error}.") from error
    start = next((i for i, row in enumerate(rows) if row and row[0] == "Step"), None)
    if start is None:
        raise TrainTrainError(f"{Path(path).name} has no 'Step,Loss,…' row: it is not a TrainTrain CSV log.")
    header = {row[0]: row[1] if len(row) > 1 else "" for row in rows[:start] if row}
    columns = rows[start]
    table = pd.DataFrame([row for row in rows[start + 1 :] if len(row) == len(columns)], columns=columns)
    return TrainingLog(Path(path), header, table.apply(pd.to_numeric, errors="coerce"))


def plot_log(log: TrainingLog) -> Figure:
    """Loss EMA (left axis, red; the raw loss faint behind it) and every learning-rate column (right axis) against the
    step; title, legend, grid."""
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot(1, 1, 1)
    steps = log.table["Step"]
    lines = []
    if RAW_LOSS in log.table.columns:
        lines += loss_axis.plot(steps, log.table[RAW_LOSS], color="tab:red", alpha=0.25, linewidth=0.8, label=RAW_LOSS)
    lines += loss_axis.plot(steps, log.table["Loss"], color="tab:red", label="Loss (EMA)")
    loss_axis.set_xlabel("Step")
    loss_axis.set_ylabel("Loss")
    loss_axis.grid(True, alpha=0.4)
    lr_axis = loss_axis.twinx()
    for column in (c for c in log.table.columns if c.startswith("Learning Rate")):
        lines += lr_axis.plot(steps, log.table[column], linestyle="--", label=column)
    lr_axis.set_ylabel("Learning Rates")
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    name = log.header.get("save_lora_name") or log.path.stem
    figure.suptitle(f"Training Result: {name}")
    figure.tight_layout()
    return figure


def plot_named(logs_dir: Path, name: str = "") -> Figure:
    """The figure of the log `name` in `logs_dir` (the newest log when blank)."""
    return plot_log(read_log(find_log(logs_dir, name)))
