"""Settings files in the original TrainTrain's format (its 59 keys, raw UI strings, written here) load and start
without a manual edit; values the original accepted and this project would refuse are corrected with a note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from traintrain.__main__ import main
from traintrain.config import TrainConfig
from traintrain.config_compat import normalised
from traintrain.demo import write_sample_images
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.progress import StopFlag

PRESETS = Path(__file__).resolve().parents[1] / "presets"
# The original's settings keys (its parameter table) and the general keys of its settings JSON.
ORIGINAL_KEYS = {
    "network_type", "network_rank", "network_alpha", "lora_data_directory", "diff_target_name", "lora_trigger_word",
    "image_size(height, width)", "train_iterations", "train_batch_size", "train_learning_rate", "train_optimizer",
    "train_optimizer_settings", "train_lr_scheduler", "train_lr_scheduler_settings", "save_lora_name",
    "use_gradient_checkpointing", "network_blocks(BASE = TextEncoder)", "network_resume", "network_strength",
    "network_conv_rank", "network_conv_alpha", "network_element", "network_train_text_encoder", "image_buckets_step",
    "image_num_multiply", "image_min_length", "image_max_ratio", "sub_image_num", "image_mirroring",
    "image_use_filename_as_tag", "image_disable_upscale", "train_fixed_timsteps_in_batch",
    "train_textencoder_learning_rate", "train_seed", "train_min_timesteps", "train_max_timesteps",
    "train_loss_function", "train_lr_step_rules", "train_lr_warmup_steps", "train_lr_scheduler_num_cycles",
    "train_lr_scheduler_power", "train_snr_gamma", "save_per_steps", "diff_alt_ratio", "diff_revert_original_target",
    "diff_use_diff_mask", "train_model_precision", "train_lora_precision", "save_precision", "train_VAE_precision",
    "diff_load_1st_pass", "diff_save_1st_pass", "diff_1st_pass_only", "logging_save_csv", "logging_verbose",
    "save_overwrite", "save_as_json", "model_v_pred", "use_2nd_pass_settings",
}  # fmt: skip
GENERAL_KEYS = {"mode", "model", "vae", "te", "original prompt", "target prompt"}
STEPS = 2  # the training is stopped after this many steps: starting is what is checked


def original_format(preset: dict) -> dict:
    """A preset as the original wrote it: only its keys, every value a raw UI value ("te" included)."""
    data = {k: v for k, v in preset.items() if k in ORIGINAL_KEYS | GENERAL_KEYS}
    if "2nd pass" in preset:
        data["2nd pass"] = {k: v for k, v in preset["2nd pass"].items() if k in ORIGINAL_KEYS}
    return {**data, "te": "None"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """What a user fills in beside a preset: the image folder, the image pair and the prompts."""
    tmp = tmp_path_factory.mktemp("inputs")
    folder = write_sample_images(tmp / "images")
    for path in list(folder.glob("*.png")):  # Multi-ADDifT pairs: <name>.png ↔ <name>_target.png
        Image.open(path).rotate(90).save(path.with_name(f"{path.stem}_target.png"))
    pair = [folder / "original.png", folder / "target.png"]
    for path, color in zip(pair, ((200, 20, 20), (20, 20, 200))):
        Image.new("RGB", (64, 64), color).save(path)
    return {"folder": str(folder), "original": str(pair[0]), "target": str(pair[1])}


def start(tmp: Path, config: TrainConfig) -> list[int]:
    """Run `config` on the tiny model of its family until STEPS steps are done; the steps seen."""
    steps: list[int] = []
    stop = StopFlag()

    def progress(event) -> None:
        steps.append(event.step)
        if event.step >= STEPS:
            stop.request(save=False)

    kind = "sdxl" if "XL" in config.save_lora_name else "sd1"
    dirs = OutputDirs(tmp / "Lora", tmp / "logs", tmp / "jsons")
    run_training(RunContext(config, build_tiny(kind), dirs, progress=progress, stop=stop))
    return steps


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.json")), ids=lambda p: p.stem)
def test_the_originals_presets_load_and_start(path: Path, inputs, tmp_path) -> None:
    data = original_format(json.loads(path.read_text()))
    data.update({"original prompt": "a red circle", "original image": inputs["original"],
                 "target image": inputs["target"], "diff_target_name": "_target"})  # fmt: skip
    if data["mode"] in ("LoRA", "Multi-ADDifT"):
        data["lora_data_directory"] = inputs["folder"]
    data.update({"image_size(height, width)": "64", "image_min_length": "64"})  # the tiny model's size (speed only)
    file = tmp_path / path.name
    file.write_text(json.dumps(data, indent=4))
    config, notes = normalised(TrainConfig.load_json(file))
    assert config.unknown_keys == () and notes == []
    config.validate()
    assert start(tmp_path, config)[:STEPS] == [1, 2]


def test_values_the_original_accepted_are_corrected_with_notes(tmp_path) -> None:
    """image size 500, bucket step 0, min length 500, max ratio 0.5, max timesteps 1200: all were accepted by the
    original; here they are corrected (and said so), and the training starts."""
    images = write_sample_images(tmp_path / "images")
    data = original_format(json.loads((PRESETS / "LoRA.json").read_text()))
    data.update({
        "image_size(height, width)": "500", "image_buckets_step": "0", "image_min_length": "500",
        "image_max_ratio": "0.5", "train_max_timesteps": "1200", "lora_data_directory": str(images),
    })  # fmt: skip
    saved = tmp_path / "jsons" / "20240101" / "LoRA-20240101_120000.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps(data, indent=4))
    raw = TrainConfig.load_json(saved)
    assert raw.problems(), "without the correction these values are refused"
    config, notes = normalised(raw)
    config.validate()
    assert (config.image_size, config.image_buckets_step, config.image_min_length) == ((496, 496), 256, 496)
    assert (config.image_max_ratio, config.train_max_timesteps) == (2.0, 1000)
    assert len(notes) == 5 and "500 → 496" in notes[0] and "1200 → 1000" in notes[-1]
    assert start(tmp_path, config)[:STEPS] == [1, 2]


@pytest.mark.parametrize(
    "key, value",
    [("image_size(height, width)", "40"), ("image_max_ratio", "0"), ("train_min_timesteps", "1000"),
     ("image_buckets_step", "4")],
)  # fmt: skip
def test_values_without_a_clear_meaning_are_still_refused(key: str, value: str) -> None:
    config, notes = normalised(TrainConfig.from_json_dict({key: value, "train_max_timesteps": "1200"}))
    assert config.problems()


def test_second_pass_values_are_corrected_too() -> None:
    data = {"mode": "Difference", "use_2nd_pass_settings": True, "2nd pass": {"train_max_timesteps": "1100"}}
    config, notes = normalised(TrainConfig.from_json_dict(data))
    assert config.second_pass.train_max_timesteps == 1000 and notes == [
        "2nd pass: 'train max timesteps' 1100 → 1000: the model has 1000 timesteps (0 … 999)."
    ]


def test_cli_prints_the_notes(tmp_path, capsys) -> None:
    images = write_sample_images(tmp_path / "images")
    data = original_format(json.loads((PRESETS / "LoRA.json").read_text()))
    data.update({"image_size(height, width)": "68", "image_min_length": "64", "train_iterations": "1",
                 "lora_data_directory": str(images), "train_model_precision": "fp32"})  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(data))
    assert main(["train", "--config", str(tmp_path / "s.json"), "--model", "tiny", "--out", str(tmp_path / "o")]) == 0
    assert "note: 'image size(height, width)' 68 → 64" in capsys.readouterr().err
