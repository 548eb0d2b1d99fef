"""iLECO's preview buttons: Generate Original / Target / All and the two galleries (shown in iLECO mode only)."""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from traintrain.jobs import ModelProvider
from traintrain.previews import preview_requests
from traintrain.ui.handlers import shows_errors
from traintrain.ui.params import ParamsPanel

PREVIEW_MODE = "iLECO"


class PreviewPanel:
    """Buttons and galleries; built where the panel should appear, wired by `connect` once the parameters exist."""

    def __init__(self) -> None:
        with gr.Row(visible=False, elem_id="tt_previews") as self.row:
            with gr.Column():
                self.original_button = gr.Button("Generate Original", elem_id="tt_preview_original")
                self.original = gr.Gallery(label="Original", elem_id="tt_gallery_original")
            with gr.Column():
                self.target_button = gr.Button("Generate Target", elem_id="tt_preview_target")
                self.target = gr.Gallery(label="Target", elem_id="tt_gallery_target")
            self.all_button = gr.Button("Generate All", elem_id="tt_preview_all", scale=0, min_width=140)

    def connect(self, params: ParamsPanel, provider: ModelProvider, message: Any) -> None:
        """Each button draws from the current settings (prompts, negative prompt, image size, model)."""
        outputs = [self.original, self.target, message]
        buttons = {"original": self.original_button, "target": self.target_button, "all": self.all_button}
        for which, button in buttons.items():
            handler = shows_errors(self.generate(params, provider, which), other_outputs=2)
            button.click(handler, inputs=params.inputs, outputs=outputs)
        params.mode.change(shown_in, inputs=[params.mode], outputs=[self.row])

    @staticmethod
    def generate(params: ParamsPanel, provider: ModelProvider, which: str) -> Callable[..., tuple]:
        """The handler of one button: (Original gallery, Target gallery, message); a gallery it does not draw stays."""

        def handler(*values: Any) -> tuple:
            config = params.read(values)
            requests = preview_requests(config, which)
            images = iter(provider.preview(config, requests))
            original = [next(images)] if which != "target" else gr.update()
            target = [next(images)] if which != "original" else gr.update()
            return original, target, f"Preview drawn (seed {requests[0].seed})."

        return handler


def shown_in(mode: str) -> dict:
    """The previews row's visibility for `mode`."""
    return gr.update(visible=mode == PREVIEW_MODE)
