"""Hostile inputs: huge numbers, deep nesting, broken queue files and malformed LoRA files end in messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from traintrain.config import TrainConfig
from traintrain.errors import TrainTrainError
from traintrain.jobs import JobQueue, OpenModelProvider
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs
from traintrain.networks.kohya_io import network_from_file

HUGE = 10**400
NUMERIC_KEYS = ("network_rank", "train_iterations", "train_learning_rate", "image_num_multiply", "network_strength")


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [HUGE, str(HUGE), -HUGE])
def test_huge_numbers_are_a_message_not_an_overflow(key, value) -> None:
    with pytest.raises(TrainTrainError) as caught:
        TrainConfig.from_json_dict({key: value}).validate()
    assert key.replace("_", " ") in str(caught.value) and len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"network_rank": 100_000}, "'network rank' must be at most 1024"),
        ({"network_alpha": 1e9}, "'network alpha' must be at most 1024"),
        ({"network_conv_rank": 4096}, "'network conv rank' must be at most 1024"),
        ({"network_strength": 1e30}, "'network strength' must be at most 100"),
        ({"network_strength": -1e30}, "'network strength' must be at least -100"),
        ({"image_size": (512, 10**6)}, "from 64 to 4096"),
        ({"image_min_length": 10**6}, "from 64 to 4096"),
        ({"image_buckets_step": 10**6}, "'image buckets step' must be a multiple of 8"),
        ({"train_batch_size": 100_000}, "'train batch size' must be at most 256"),
        ({"train_iterations": 10**9}, "'train iterations' must be at most 1e\\+06"),
        ({"image_num_multiply": 10**6}, "'image num multiply' must be at most 1000"),
        ({"sub_image_num": 10**6}, "'sub image num' must be at most 100"),
        ({"train_learning_rate": 1e30}, "'train learning rate' must be above 0 and at most 10"),
        ({"train_seed": -5}, "'train seed' must be -1"),
    ],
)
def test_every_number_has_an_upper_bound(changes, words) -> None:
    with pytest.raises(TrainTrainError, match=words):
        TrainConfig(**changes).validate()


def test_the_largest_allowed_values_pass() -> None:
    TrainConfig(
        network_rank=1024, network_alpha=1024.0, image_size=(4096, 4096), train_batch_size=256,
        train_iterations=1_000_000, image_num_multiply=1000, network_strength=-100.0, train_learning_rate=10.0,
        lora_data_directory=".",
    ).validate()  # fmt: skip


def deeply_nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_settings_file_is_a_message(tmp_path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"network_rank": ' + deeply_nested(100_000) + "}")
    with pytest.raises(TrainTrainError, match="nested too deeply"):
        TrainConfig.load_json(path)


@pytest.mark.parametrize(
    "content", [deeply_nested(100_000), "{oops", '{"jobs": 5}', '["a"]', '{"jobs": [{"network_rank": "x"}]}', ""]
)
def test_a_broken_queue_file_is_kept_aside_and_the_queue_starts_empty(tmp_path, content) -> None:
    queue_file = tmp_path / "queue.json"
    queue_file.write_text(content)
    queue = JobQueue(OpenModelProvider(), OutputDirs(tmp_path / "L", tmp_path / "l", tmp_path / "j"), queue_file)
    try:
        assert queue.entries() == []
        message = queue.status().message
        assert "Could not read the saved queue" in message and "kept as" in message
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("queue.json.bad-")]
        assert len(aside) == 1 and aside[0].read_text() == content, "the user's file is kept, not lost"
    finally:
        queue.close()


# ----- malformed LoRA files for resume / diff load 1st pass


def tiny_targets():
    return build_tiny("sd1").lora_targets()


def linear_target():
    return next(t for t in tiny_targets() if isinstance(t.module, torch.nn.Linear))


def write_lora(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def lora_module(name: str, rank: int, fan_in: int, fan_out: int, alpha=None, dtype=torch.float32) -> dict:
    tensors = {
        f"{name}.lora_down.weight": torch.zeros(rank, fan_in, dtype=dtype),
        f"{name}.lora_up.weight": torch.zeros(fan_out, rank, dtype=dtype),
    }
    if alpha is not None:
        tensors[f"{name}.alpha"] = alpha
    return tensors


def malformed_files():
    target = linear_target()
    name, fan_in, fan_out = target.name, target.module.in_features, target.module.out_features
    loha = {
        f"{name}.hada_w1_a": torch.zeros(fan_out, 4), f"{name}.hada_w1_b": torch.zeros(4 * fan_in),
        f"{name}.hada_w2_a": torch.zeros(fan_out, 4), f"{name}.hada_w2_b": torch.zeros(4 * fan_in),
        f"{name}.alpha": torch.tensor(4.0),
    }  # fmt: skip
    return {
        "rank 0": (lora_module(name, 0, fan_in, fan_out, torch.tensor(1.0)), "rank"),
        "3-element alpha": (lora_module(name, 4, fan_in, fan_out, torch.tensor([1.0, 2.0, 3.0])), "alpha has 3 values"),
        "1-D LoHa factor": (loha, "not LoHa factors"),
        "integer weights": (lora_module(name, 4, fan_in, fan_out, dtype=torch.int32), "torch.int32"),
        "NaN weights": ({**lora_module(name, 4, fan_in, fan_out), f"{name}.lora_up.weight": torch.full((fan_out, 4), float("nan"))}, "NaN"),
        "wrong fan-in": (lora_module(name, 4, fan_in + 1, fan_out, torch.tensor(4.0)), "does not fit this model"),
        "broadcastable down": (lora_module(name, 4, 1, fan_out, torch.tensor(4.0)), "does not fit this model"),
        "rank mismatch": ({**lora_module(name, 4, fan_in, fan_out), f"{name}.lora_up.weight": torch.zeros(fan_out, 8)}, "not a rank-r pair"),
        "no up weight": ({f"{name}.lora_down.weight": torch.zeros(4, fan_in)}, "lacks lora_up.weight"),
        "unknown part": ({**lora_module(name, 4, fan_in, fan_out), f"{name}.lora_mid.weight": torch.zeros(4, 4)}, "cannot load"),
        "zero alpha": (lora_module(name, 4, fan_in, fan_out, torch.tensor(0.0)), "alpha is 0.0"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(malformed_files()))
def test_malformed_lora_files_are_refused_with_a_message(tmp_path, case) -> None:
    tensors, words = malformed_files()[case]
    with pytest.raises(TrainTrainError, match=words):
        network_from_file(write_lora(tmp_path, tensors), tiny_targets())


def test_a_well_formed_file_still_loads(tmp_path) -> None:
    target = linear_target()
    tensors = lora_module(target.name, 4, target.module.in_features, target.module.out_features, torch.tensor(2.0))
    network = network_from_file(write_lora(tmp_path, tensors), tiny_targets())
    adapter = network.adapters[target.name]
    assert adapter.rank == 4 and float(adapter.alpha) == 2.0


def test_queue_file_written_by_the_queue_reads_back(tmp_path) -> None:
    queue_file = tmp_path / "queue.json"
    queue_file.write_text(json.dumps({"jobs": [TrainConfig(save_lora_name="a", lora_data_directory=str(tmp_path)).to_json_dict()]}))
    queue = JobQueue(OpenModelProvider(), OutputDirs(tmp_path / "L", tmp_path / "l", tmp_path / "j"), queue_file)
    try:
        assert [e.name for e in queue.entries()] == ["a"] and "wait in the queue" in queue.status().message
    finally:
        queue.close()


# ----- data: one bad entry never ends the run; high-bit-depth images keep their brightness


def test_an_image_with_a_very_long_name_trains(tmp_path) -> None:
    from traintrain.data.dataset import load_image_dataset
    from traintrain.data.options import DataOptions
    from traintrain.demo import write_sample_images

    folder = write_sample_images(tmp_path / "images")
    count = len(list(folder.glob("*.png")))
    long_stem = "x" * 250  # 254 bytes with ".png": allowed; its ".caption" sibling (258 bytes) cannot exist
    sorted(folder.glob("*.png"))[0].rename(folder / f"{long_stem}.png")
    dataset = load_image_dataset(folder, DataOptions(image_size=(64, 64), min_length=64, trigger_word="sks"))
    assert len(dataset.prompts) == count and "sks" in dataset.prompts, "the long-named image trains, uncaptioned"


def test_an_unreadable_caption_warns_and_the_image_trains_without_it(tmp_path, caplog, monkeypatch) -> None:
    from traintrain.data.captions import read_caption

    (tmp_path / "a.txt").write_text("locked")
    real_read = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.suffix == ".txt":
            raise PermissionError(13, "Permission denied")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert read_caption(tmp_path / "a.png") == ""
    assert "without its caption" in caplog.text and "Permission denied" in caplog.text


def gray_ramp(tmp_path: Path, name: str, array) -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize(
    ("name", "peak", "dtype"), [("ramp16.png", 65535, "uint16"), ("ramp01.tiff", 1.0, "float32"), ("ramp255.tiff", 255.0, "float32")]
)
def test_high_bit_depth_and_float_images_keep_their_brightness(tmp_path, name, peak, dtype) -> None:
    import numpy as np

    from traintrain.data.images import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    path = gray_ramp(tmp_path, name, (ramp * peak).astype(dtype))
    pixels = np.asarray(load_image(path), dtype=np.float64)
    assert pixels.shape == (64, 64, 3)
    assert abs(pixels.mean() - 127.5) < 1.5, "mid grey on average, not white or black"
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("values", [[-1.0, 0.5], [0.0, 1000.0], [0.0, float("nan")]])
def test_float_images_without_an_8_bit_meaning_are_skipped_with_a_warning(tmp_path, caplog, values) -> None:
    import numpy as np

    from traintrain.data.images import load_image

    path = gray_ramp(tmp_path, "hdr.tiff", np.array([values] * 8, dtype=np.float32))
    assert load_image(path) is None
    assert "Skipping" in caplog.text and "hdr.tiff" in caplog.text


@pytest.mark.parametrize("path", ["a" * 300, "x/" + "b" * 300 + "/y", "nul\x00byte", "   "])
def test_impossible_paths_in_settings_are_messages(tmp_path, path) -> None:
    config = TrainConfig(network_resume=path, lora_data_directory=path, save_lora_name="x")
    problems = "\n".join(config.problems())
    assert "'lora data directory'" in problems
    assert path.strip() == "" or "'network resume'" in problems
