"""The Plot tab: a CSV log of `logs/` (the newest when no name is given) drawn as loss and learning rates."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from matplotlib.figure import Figure

from traintrain.plot import find_log, plot_log, read_log
from traintrain.ui.handlers import shows_errors
from traintrain.ui.inputs import text


class PlotPanel:
    """Name box, reload button, the figure and a message line."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = Path(logs_dir)
        with gr.Row():
            self.name = gr.Textbox(
                label="Name of logfile, blank for last or current training", elem_id="tt_plot_name", scale=4
            )
            self.reload_button = gr.Button("Reload Plot", elem_id="tt_plot_reload", scale=1)
        self.message = gr.Textbox(label="Plot message", interactive=False, elem_id="tt_plot_message", lines=1)
        self.plot = gr.Plot(label="Training Result", elem_id="tt_plot")
        self.reload_button.click(
            shows_errors(self.reload, other_outputs=1), inputs=[self.name], outputs=[self.plot, self.message]
        )

    def reload(self, name: str) -> tuple[Figure, str]:
        """The figure of the named (or newest) log and which file it shows."""
        path = find_log(self.logs_dir, text(name, "Name of logfile"))
        return plot_log(read_log(path)), f"Showing {path.name}"
