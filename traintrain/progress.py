"""The one progress event type and the stop flag shared by the loop, the job queue, the UI and the CLI."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """Where a training stands: step of total, last loss and learning rate, elapsed and estimated remaining seconds."""

    step: int
    total: int
    loss: float
    lr: float
    elapsed: float
    eta: float
    phase: str = ""  # e.g. "1st pass" in Difference mode

    def describe(self) -> str:
        """One status line for the UI and logs."""
        phase = f"{self.phase}: " if self.phase else ""
        return (
            f"{phase}step {self.step}/{self.total}, loss {self.loss:.5f}, lr {self.lr:.3g}, "
            f"elapsed {_clock(self.elapsed)}, ETA {_clock(self.eta)}"
        )


ProgressCallback = Callable[[Progress], None]


def console_progress() -> ProgressCallback:
    """A callback drawing one tqdm bar per phase on the console (the WebUI's terminal, the CLI): step, loss, lr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(p: Progress) -> None:
        if p.phase not in bars:
            bars[p.phase] = tqdm(total=p.total, desc=p.phase or "TrainTrain", unit="step", dynamic_ncols=True)
        bar = bars[p.phase]
        bar.update(p.step - bar.n)
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}", refresh=False)
        if p.step >= p.total:
            bar.close()

    return update


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopFlag:
    """Set by the Stop button (or an interrupt); the loop checks it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.save = True

    def request(self, save: bool = True) -> None:
        """Ask the running training to stop after the current step, saving what it has when `save`."""
        self.save = save
        self._event.set()

    def clear(self) -> None:
        """Reset for the next job."""
        self._event.clear()
        self.save = True

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()
