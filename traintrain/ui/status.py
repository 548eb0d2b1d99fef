"""The status line: the running job's step, loss, lr, elapsed, ETA and an HTML progress bar; the queue as table rows."""

from __future__ import annotations

from html import escape

from traintrain.jobs import JobEntry, JobQueue, QueueStatus

QUEUE_HEADERS = ["Name", "Mode", "Model", "Rank", "Steps", "LR", "Status", "Message"]


def render_status(status: QueueStatus) -> str:
    """HTML for the status box (polled by the UI while the page is open)."""
    progress = status.progress
    if status.running:
        line = f"Training {status.current!r}: " + (progress.describe() if progress else "loading the model…")
        fraction = progress.step / progress.total if progress and progress.total else 0.0
    else:
        line = "Idle."
        fraction = 0.0
    waiting = f"{status.queued} job(s) queued" + (" (paused: press Run queue)" if status.paused else "")
    return (
        f'<div class="tt-status tt-{status.state}" data-state="{status.state}">'
        f'<div class="tt-status-line">{escape(line)}</div>'
        f'<div class="tt-progress" role="progressbar" aria-valuenow="{fraction * 100:.0f}" aria-valuemin="0" '
        f'aria-valuemax="100"><div class="tt-progress-fill" style="width:{fraction * 100:.1f}%"></div></div>'
        f'<div class="tt-status-message">{escape(status.message)}</div>'
        f'<div class="tt-status-queue">{escape(waiting) if status.queued else ""}</div>'
        "</div>"
    )


def queue_rows(queue: JobQueue) -> list[list[str]]:
    """Rows for the queue table: running and queued jobs, then the finished ones (newest first)."""
    entries: list[JobEntry] = queue.entries() + list(queue.status().results)
    rows = [[e.name, e.mode, e.model, e.rank, e.steps, e.lr, e.state, e.message] for e in entries]
    return rows or [[""] * len(QUEUE_HEADERS)]
