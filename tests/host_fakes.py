"""What every host stand-in shares: the WebUI's `shared.state`."""

from __future__ import annotations


class FakeState:
    """`shared.state`: the current job and the Interrupt flag."""

    def __init__(self) -> None:
        self.job, self.interrupted = "", False

    def begin(self, job: str = "(unknown)") -> None:
        self.job, self.interrupted = job, False

    def end(self) -> None:
        self.job = ""
