"""Image dataset: cover-resize and centre crop, sub-images, mirroring, repeats, alpha masks, corrupt and small files."""

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traintrain.data import DataOptions, load_image_dataset
from traintrain.data.images import BACKGROUND
from traintrain.errors import TrainTrainError

SQUARE_64 = DataOptions(image_size=64, buckets_step=64, min_length=64)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _striped(width: int, height: int, stripe: tuple[int, int]) -> np.ndarray:
    """Blue image with a red vertical stripe over columns [stripe[0], stripe[1])."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :] = BLUE
    array[:, stripe[0] : stripe[1]] = RED
    return array


@pytest.mark.parametrize(("width", "height", "stripe"), [(128, 64, (56, 72)), (256, 128, (112, 144))])
def test_wide_image_is_cover_resized_and_centre_cropped(tmp_path: Path, width: int, height: int, stripe: tuple) -> None:
    _save(tmp_path / "wide.png", _striped(width, height, stripe))
    dataset = load_image_dataset(tmp_path, SQUARE_64)
    (sample,) = dataset.samples
    assert sample.bucket == (64, 64) and sample.pixels.shape == (3, 64, 64)
    assert sample.pixels.dtype == torch.float32 and sample.pixels.min() >= -1 and sample.pixels.max() <= 1
    # the stripe sat at columns 56..72 of 128 after resizing: 24..40 of the crop (32 columns cut on each side)
    red = (sample.pixels[0] > 0.5) & (sample.pixels[2] < -0.5)
    columns = red.all(dim=0).nonzero().flatten().tolist()
    assert columns[0] in (23, 24, 25) and columns[-1] in (38, 39, 40)
    assert torch.allclose(sample.pixels[:, :, 0], torch.tensor([-1.0, -1.0, 1.0])[:, None].expand(3, 64), atol=0.05)
    assert sample.mask is None


def test_tall_image_keeps_its_middle_rows(tmp_path: Path) -> None:
    array = np.zeros((192, 64, 3), dtype=np.uint8)
    array[80:112] = (0, 255, 0)
    _save(tmp_path / "tall.png", array)
    (sample,) = load_image_dataset(tmp_path, SQUARE_64).samples
    green_rows = (sample.pixels[1] > 0.9).all(dim=1).nonzero().flatten().tolist()
    assert green_rows == list(range(16, 48))  # rows 64..128 kept: the band at 80..112 lands on 16..48


def test_design_example_one_image_gives_eight_samples(tmp_path: Path) -> None:
    gradient = np.linspace(0, 255, 512)[None, :, None].repeat(640, axis=0).repeat(3, axis=2)
    _save(tmp_path / "portrait.png", gradient)
    options = DataOptions(image_size="768,512", buckets_step=128, min_length=256, sub_image_num=3, mirroring=True)
    dataset = load_image_dataset(tmp_path, options)
    assert len(dataset) == 8
    buckets = Counter(sample.bucket for sample in dataset.samples)
    assert buckets == {(512, 640): 2, (384, 640): 2, (256, 384): 2, (384, 512): 2}
    for sample in dataset.samples:
        assert sample.pixels.shape == (3, sample.bucket[1], sample.bucket[0])
    original, mirrored = dataset.samples[0], dataset.samples[1]
    assert torch.equal(mirrored.pixels, original.pixels.flip(-1))
    assert original.pixels[0, 0, 0] < original.pixels[0, 0, -1]  # the gradient runs left to right
    assert dataset.prompts == [""]


def test_num_multiply_and_mirroring_counts(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / f"{i}.png", np.full((64, 64, 3), 40 * i))
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, mirroring=True, num_multiply=3)
    dataset = load_image_dataset(tmp_path, options)
    assert len(dataset.samples) == 6 and len(dataset) == 18 and dataset.repeats == 3
    assert dataset.bucket_counts() == {(64, 64): 6}


def test_rgba_image_gives_a_latent_size_mask_and_grey_background(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :, :3] = RED
    rgba[:, 32:, 3] = 255  # right half opaque
    rgba[:, 28:32, 3] = 20  # alpha 0.08 < 0.1: masked out
    _save(tmp_path / "cutout.png", rgba)
    _save(tmp_path / "plain.png", np.full((64, 64, 3), 200))
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, mirroring=True)
    cutout, cutout_mirrored, plain, _ = load_image_dataset(tmp_path, options).samples
    expected = torch.zeros(1, 8, 8)
    expected[:, :, 4:] = 1
    assert torch.equal(cutout.mask, expected)
    assert torch.equal(cutout_mirrored.mask, expected.flip(-1))
    grey = BACKGROUND[0] / 127.5 - 1
    assert torch.allclose(cutout.pixels[:, :, :20], torch.full((3, 64, 20), grey), atol=1e-6)
    assert torch.allclose(cutout.pixels[:, :, 40:], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 64, 24))
    assert plain.mask is None


def test_corrupt_file_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path / "good.png", np.zeros((64, 64, 3)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with caplog.at_level(logging.WARNING):
        dataset = load_image_dataset(tmp_path, SQUARE_64)
    assert len(dataset.samples) == 1 and dataset.skipped == [tmp_path / "broken.jpg"]
    assert "broken.jpg" in caplog.text


def test_only_corrupt_files_raise(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(TrainTrainError, match="could not be read"):
        load_image_dataset(tmp_path, SQUARE_64)


def test_disable_upscale_skips_buckets_larger_than_the_image(tmp_path: Path) -> None:
    _save(tmp_path / "small.png", np.zeros((48, 48, 3)))
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, disable_upscale=True)
    with pytest.raises(TrainTrainError, match="disable upscale"):
        load_image_dataset(tmp_path, options)
    _save(tmp_path / "large.png", np.zeros((80, 80, 3)))
    dataset = load_image_dataset(tmp_path, options)
    assert len(dataset.samples) == 1 and dataset.prompts == [""]
    upscaled = load_image_dataset(tmp_path, SQUARE_64)
    assert len(upscaled.samples) == 2 and all(s.pixels.shape == (3, 64, 64) for s in upscaled.samples)


def test_sub_images_skip_only_the_buckets_needing_upscale(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", np.zeros((96, 96, 3)))
    options = DataOptions(image_size=128, buckets_step=32, min_length=64, sub_image_num=2, disable_upscale=True)
    dataset = load_image_dataset(tmp_path, options)  # main 128x128 needs upscale; subs 96x96 and 64x64 do not
    assert [s.bucket for s in dataset.samples] == [(96, 96), (64, 64)]
    _save(tmp_path / "a.png", np.zeros((80, 80, 3)))
    assert [s.bucket for s in load_image_dataset(tmp_path, options).samples] == [(64, 64)]


def test_prompts_use_trigger_and_captions(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", np.zeros((64, 64, 3)))
    _save(tmp_path / "b.png", np.zeros((64, 64, 3)))
    (tmp_path / "a.txt").write_text("a red ball")
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, trigger_word="sks", mirroring=True)
    dataset = load_image_dataset(tmp_path, options)
    assert dataset.prompts == ["sks, a red ball", "sks"]
    assert [s.prompt for s in dataset.samples] == ["sks, a red ball"] * 2 + ["sks"] * 2
