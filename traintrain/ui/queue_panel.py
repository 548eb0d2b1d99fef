"""The Queue tab: the running, queued and finished jobs; remove a queued job by name; run the queue."""

from __future__ import annotations

import gradio as gr

from traintrain.jobs import JobQueue
from traintrain.ui.compat import table
from traintrain.ui.handlers import shows_errors
from traintrain.ui.inputs import text
from traintrain.ui.status import QUEUE_HEADERS, queue_rows

POLL_SECONDS = 2.0


class QueuePanel:
    """The job table (refreshed every few seconds) and its actions."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        with gr.Row():
            self.run_button = gr.Button("Run queue", variant="primary", elem_id="tt_queue_run")
            self.reload_button = gr.Button("Reload Queue", elem_id="tt_queue_reload")
            self.name = gr.Textbox(label="Name of Queue to delete", elem_id="tt_queue_name", scale=2)
            self.remove_button = gr.Button("Delete Queue", variant="stop", elem_id="tt_queue_remove")
        self.message = gr.Textbox(label="Queue message", interactive=False, elem_id="tt_queue_message")
        self.table = table(QUEUE_HEADERS, "tt_queue_table", "Queue", value=self.rows, every=POLL_SECONDS)
        self.reload_button.click(self.rows, outputs=[self.table])
        self.remove_button.click(shows_errors(self.remove, 1), inputs=[self.name], outputs=[self.table, self.message])
        self.run_button.click(shows_errors(self.run, 1), outputs=[self.table, self.message])

    def rows(self) -> list[list[str]]:
        """The current table."""
        return queue_rows(self.queue)

    def remove(self, name: str) -> tuple[list[list[str]], str]:
        """Remove a queued job."""
        message = self.queue.remove(text(name, "Name of Queue to delete"))
        return self.rows(), message

    def run(self) -> tuple[list[list[str]], str]:
        """Start the queued jobs."""
        message = self.queue.run_queue()
        return self.rows(), message
