"""The Image tab: make rotated / shrunk variants of one image or of a folder of images (dataset augmentation)."""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr
from PIL import Image

from traintrain.augment import SIDES, AugmentSettings, augment_folder, save_variants
from traintrain.errors import TrainTrainError
from traintrain.ui.compat import image_input
from traintrain.ui.handlers import shows_errors


class ImagePanel:
    """Settings, the two sources (folder or uploaded image) and a message line."""

    def __init__(self) -> None:
        gr.Markdown("Rotate random angle and scaling: makes variants on a transparent canvas of the original size.")
        with gr.Row():
            with gr.Column():
                self.side = gr.Radio(list(SIDES), value="none", label="fix side", elem_id="tt_img_side")
                self.count = gr.Slider(0, 1000, value=5, step=1, label="number of images", elem_id="tt_img_count")
                self.max_angle = gr.Slider(0, 180, value=180, step=1, label="max tilting angle", elem_id="tt_img_angle")
                self.min_scale = gr.Slider(
                    0.01, 1, value=0.4, step=0.01, label="minimum downscale ratio", elem_id="tt_img_scale"
                )
                with gr.Row():
                    self.rotate = gr.Checkbox(value=True, label="change angle", elem_id="tt_img_rotate")
                    self.scale = gr.Checkbox(value=True, label="change scale", elem_id="tt_img_rescale")
                    self.seed = gr.Number(value=-1, precision=0, label="seed (-1 = random)", elem_id="tt_img_seed")
                self.folder = gr.Textbox(
                    label="Image directory (variants go to <directory>/modified)", elem_id="tt_img_dir"
                )
                self.from_folder = gr.Button("From Directory", elem_id="tt_img_from_dir")
            with gr.Column():
                self.image = image_input("Image", "tt_img_input")
                self.stem = gr.Textbox(label="Output name", elem_id="tt_img_name")
                self.out_dir = gr.Textbox(label="Output directory", elem_id="tt_img_out")
                self.from_file = gr.Button("From File", elem_id="tt_img_from_file")
        self.message = gr.Textbox(label="Image message", interactive=False, elem_id="tt_img_message")
        settings = [self.count, self.rotate, self.max_angle, self.scale, self.min_scale, self.side, self.seed]
        self.from_folder.click(shows_errors(self.run_folder), inputs=[self.folder, *settings], outputs=[self.message])
        self.from_file.click(
            shows_errors(self.run_file), inputs=[self.image, self.stem, self.out_dir, *settings], outputs=[self.message]
        )

    def run_folder(self, folder: str, *settings: object) -> str:
        """Variants of every image in `folder`."""
        if not folder.strip():
            raise TrainTrainError("Give the image directory.")
        chosen = _settings(*settings)
        paths = augment_folder(Path(folder.strip()), chosen)
        return f"Wrote {len(paths)} image(s) to {Path(folder.strip()) / 'modified'} (seed {chosen.seed})."

    def run_file(self, image: Image.Image | None, stem: str, out_dir: str, *settings: object) -> str:
        """Variants of the uploaded image."""
        if image is None:
            raise TrainTrainError("Upload an image first.")
        if not out_dir.strip():
            raise TrainTrainError("Give the output directory.")
        chosen = _settings(*settings)
        paths = save_variants(image, stem or "image", Path(out_dir.strip()), chosen)
        return f"Wrote {len(paths)} image(s) to {out_dir.strip()} (seed {chosen.seed})."


def _settings(count, rotate, max_angle, scale, min_scale, side, seed) -> AugmentSettings:  # noqa: ANN001 - UI values
    seed = int(seed if seed is not None else -1)
    return AugmentSettings(
        count=int(count),
        rotate=bool(rotate),
        max_angle=float(max_angle),
        scale=bool(scale),
        min_scale=float(min_scale),
        side=str(side),
        seed=seed if seed >= 0 else random.randrange(2**31),
    )
