"""The embedded default: the tiny built-in model, a few generated images with captions, one short LoRA training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from traintrain.config import TrainConfig

SAMPLES = (
    ("red_circle", "a red circle on a white background", (220, 30, 30), "ellipse"),
    ("blue_square", "a blue square on a white background", (30, 60, 220), "rectangle"),
    ("green_circle", "a green circle on a white background", (30, 180, 60), "ellipse"),
    ("yellow_square", "a yellow square on a white background", (230, 200, 20), "rectangle"),
)


def write_sample_images(folder: Path, size: int = 64, seed: int = 0) -> Path:
    """Write four small captioned images (a shape with a little noise) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, caption, color, shape in SAMPLES:
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
        getattr(draw, shape)(box, fill=color)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return folder


def demo_config(data_dir: Path, iterations: int = 80) -> TrainConfig:
    """LoRA-mode settings for the tiny model: 64 px, rank 8, a high learning rate so the loss falls in seconds."""
    return TrainConfig(
        mode="LoRA",
        lora_data_directory=str(data_dir),
        lora_trigger_word="demo style",
        image_size=(64, 64),
        image_buckets_step=64,
        image_min_length=64,
        network_rank=8,
        network_alpha=8,
        train_iterations=iterations,
        train_batch_size=2,
        train_learning_rate=5e-3,
        train_lr_scheduler="constant",
        train_seed=0,
        train_snr_gamma=0,
        save_lora_name="demo",
        save_overwrite=True,
        logging_save_csv=True,
        train_model_precision="fp32",
        save_precision="fp16",
    )
