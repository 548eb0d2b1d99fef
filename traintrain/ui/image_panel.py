"""The Image tab: make rotated / shrunk variants of one image or of a folder of images (dataset augmentation)."""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr
from PIL import Image

from traintrain.augment import MAX_VARIANTS, SIDES, AugmentSettings, augment_folder, save_variants
from traintrain.config_fields import sanitize_name
from traintrain.errors import TrainTrainError
from traintrain.ui.compat import image_input
from traintrain.ui.handlers import shows_errors
from traintrain.ui.inputs import choice, flag, number, text


class ImagePanel:
    """Settings, the two sources (folder or uploaded image) and a message line."""

    def __init__(self) -> None:
        gr.Markdown("Rotate random angle and scaling: makes variants on a transparent canvas of the original size.")
        with gr.Row():
            with gr.Column():
                self.side = gr.Radio(list(SIDES), value="none", label="fix side", elem_id="tt_img_side")
                self.count = gr.Slider(0, MAX_VARIANTS, value=5, step=1, label="number of images", elem_id="tt_img_count")
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
        folder = text(folder, "Image directory").strip()
        if not folder:
            raise TrainTrainError("Give the image directory.")
        chosen = _settings(*settings)
        paths = augment_folder(Path(folder), chosen)
        return f"Wrote {len(paths)} image(s) to {Path(folder) / 'modified'} (seed {chosen.seed})."

    def run_file(self, image: Image.Image | None, stem: str, out_dir: str, *settings: object) -> str:
        """Variants of the uploaded image."""
        if not isinstance(image, Image.Image):
            raise TrainTrainError("Upload an image first.")
        stem, out_dir = text(stem, "Output name").strip(), text(out_dir, "Output directory").strip()
        if not out_dir:
            raise TrainTrainError("Give the output directory.")
        chosen = _settings(*settings)
        paths = save_variants(image, sanitize_name(stem or "image"), Path(out_dir), chosen)
        return f"Wrote {len(paths)} image(s) to {out_dir} (seed {chosen.seed})."


def _settings(*values: object) -> AugmentSettings:
    """The tab's settings, read and bounded here whatever the page sent."""
    if len(values) != 7:
        raise TrainTrainError(f"Expected 7 image settings, got {len(values)}: reload the page.")
    count, rotate, max_angle, scale, min_scale, side, seed = values
    seed = -1 if seed is None or seed == "" else number(seed, "seed", -1, 2**32 - 1, whole=True)
    return AugmentSettings(
        count=number(count, "number of images", 0, MAX_VARIANTS, whole=True),
        rotate=flag(rotate, "change angle"),
        max_angle=number(max_angle, "max tilting angle", 0, 180),
        scale=flag(scale, "change scale"),
        min_scale=number(min_scale, "minimum downscale ratio", 0.01, 1),
        side=choice(side, "fix side", SIDES),
        seed=seed if seed >= 0 else random.randrange(2**31),
    )
