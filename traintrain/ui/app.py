"""The TrainTrain UI: Train (buttons, status, presets, parameters), Queue, Plot and Image tabs around one job queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from traintrain.config_compat import normalised, with_notes
from traintrain.jobs import JobQueue, ModelProvider, shared_queue
from traintrain.modes import OutputDirs
from traintrain.ui import compat
from traintrain.ui.handlers import shows_errors
from traintrain.ui.inputs import flag
from traintrain.ui.image_panel import ImagePanel
from traintrain.ui.params import Choices, ParamsPanel
from traintrain.ui.plot_panel import PlotPanel
from traintrain.ui.presets import PresetsPanel
from traintrain.ui.preview_panel import PreviewPanel
from traintrain.ui.queue_panel import QueuePanel
from traintrain.ui.status import render_status

STATUS_POLL_SECONDS = 1.0


def _no_choices() -> list[str]:
    return [""]


class TrainTrainUI:
    """The Blocks and its panels; the handlers are methods so tests can call them directly."""

    def __init__(
        self,
        queue: JobQueue,
        presets_dir: Path,
        *,
        model_choices: Choices = _no_choices,
        vae_choices: Choices = _no_choices,
        css: str = "",
    ) -> None:
        self.queue = queue
        with compat.blocks(css) as self.blocks:
            with gr.Tabs(elem_id="tt_tabs"):
                with gr.Tab("Train", elem_id="tt_tab_train"):
                    self._train_tab(presets_dir, queue.dirs.jsons, model_choices, vae_choices)
                with gr.Tab("Queue", elem_id="tt_tab_queue"):
                    self.queue_panel = QueuePanel(queue)
                with gr.Tab("Plot", elem_id="tt_tab_plot"):
                    self.plot_panel = PlotPanel(queue.dirs.logs)
                with gr.Tab("Image", elem_id="tt_tab_image"):
                    self.image_panel = ImagePanel()
        compat.keep_polling_single(self.blocks)

    def _train_tab(self, presets_dir: Path, jsons_dir: Path, model_choices: Choices, vae_choices: Choices) -> None:
        with gr.Row():
            self.start_button = gr.Button("Start Training", variant="primary", elem_id="tt_start")
            self.save_stop_button = gr.Button("Stop and Save", variant="stop", elem_id="tt_stop_save")
            self.stop_button = gr.Button("Stop without Saving", elem_id="tt_stop")
            self.add_button = gr.Button("Add to Queue", elem_id="tt_add_queue")
            self.pause_queue = gr.Checkbox(
                False, label="Pause the queue on Stop", elem_id="tt_stop_pause",
                info="Off: the next queued job starts after a Stop, as in the original TrainTrain.",
            )
            refresh = gr.Button("refresh status", elem_id="tt_status_refresh", elem_classes=["tt-hidden"])
        self.status = gr.HTML(value=self.status_html, every=STATUS_POLL_SECONDS, elem_id="tt_status")
        self.message = gr.Textbox(label="Message", interactive=False, lines=2, elem_id="tt_message")
        self.presets = PresetsPanel(presets_dir, jsons_dir)
        self.params = ParamsPanel(model_choices, vae_choices, below_prompts=self._build_previews)
        self.presets.connect(self.params, self.message)
        self.previews.connect(self.params, self.queue.provider, self.message)
        settings = self.params.inputs
        refresh.click(self.status_html, outputs=[self.status])
        self.start_button.click(shows_errors(self.start), inputs=settings, outputs=[self.message])
        self.add_button.click(shows_errors(self.add), inputs=settings, outputs=[self.message])
        for button, save in ((self.save_stop_button, True), (self.stop_button, False)):
            stop = shows_errors(lambda pause, save=save: self.stop(save, pause))
            button.click(stop, inputs=[self.pause_queue], outputs=[self.message])

    def _build_previews(self) -> None:
        self.previews = PreviewPanel()

    def status_html(self) -> str:
        """The status box's HTML now."""
        return render_status(self.queue.status())

    def start(self, *values: Any) -> str:
        """Start Training: run these settings now (queued jobs follow); corrections of the original's values noted."""
        config, notes = normalised(self.params.read(values))
        return with_notes(self.queue.start(config), notes)

    def stop(self, save: bool, pause_queue: Any) -> str:
        """Stop and Save / Stop without Saving: end the running job after its step."""
        return self.queue.stop(save=save, pause_queue=flag(pause_queue, "Pause the queue on Stop"))

    def add(self, *values: Any) -> str:
        """Add to Queue: run these settings after the queued jobs; corrections of the original's values noted."""
        config, notes = normalised(self.params.read(values))
        return with_notes(self.queue.add(config), notes)


def create_ui(
    provider: ModelProvider,
    dirs: OutputDirs,
    presets_dir: Path,
    queue_file: Path,
    *,
    model_choices: Choices = _no_choices,
    vae_choices: Choices = _no_choices,
    css: str = "",
) -> TrainTrainUI:
    """The UI object (Blocks + panels) on the process-wide queue of `queue_file`."""
    queue = shared_queue(provider, dirs, queue_file)
    return TrainTrainUI(queue, presets_dir, model_choices=model_choices, vae_choices=vae_choices, css=css)


def build_ui(*args: Any, **kwargs: Any) -> gr.Blocks:
    """The TrainTrain Blocks for the WebUI tab or the standalone launcher (arguments as `create_ui`)."""
    return create_ui(*args, **kwargs).blocks
