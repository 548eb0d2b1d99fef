"""Multi-ADDifT pairing: suffix matching, unmatched originals, size mismatch, aligned buckets and batches."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from traintrain.data import DataOptions, PairedLatentDataset, load_pair_dataset, match_pairs
from traintrain.errors import TrainTrainError

SUFFIX = "_closed_eyes"


def _image(path: Path, width: int = 64, height: int = 64, value: int = 50, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :, 0] = value
    array[:, :, 1] = np.linspace(0, 255, width)[None, :]  # left-to-right ramp shows crops and mirroring
    Image.fromarray(array).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def _encode(pixels: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]


def test_match_pairs_rules(tmp_path: Path) -> None:
    paths = [
        tmp_path / "image1.png",
        tmp_path / "image1_closed_eyes.png",
        tmp_path / "image2.png",
        tmp_path / "image4.PNG",
        tmp_path / "image4_closed_eyes.png",
        tmp_path / "sub" / "image3.jpg",
        tmp_path / "sub" / "image3_closed_eyes.webp",
        tmp_path / "sub" / "image3_closed_eyes.jpg",
        tmp_path / "other" / "image2_closed_eyes.png",  # another folder: not image2's target
    ]
    pairs, unmatched = match_pairs(paths, SUFFIX)
    assert pairs == [
        (paths[0], paths[1]),
        (paths[3], paths[4]),
        (paths[5], paths[7]),  # the same extension is preferred
    ]
    assert unmatched == [paths[2], paths[6], paths[8]]  # the unused .webp target counts as an original


def test_empty_suffix_raises(tmp_path: Path) -> None:
    with pytest.raises(TrainTrainError, match="Diff target name is empty"):
        match_pairs([tmp_path / "a.png"], "")


def test_folder_without_pairs_raises(tmp_path: Path) -> None:
    _image(tmp_path / "lonely.png")
    with pytest.raises(TrainTrainError, match="No image pair"):
        load_pair_dataset(tmp_path, SUFFIX, DataOptions(image_size=64, buckets_step=64, min_length=64))


def test_unmatched_originals_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / f"a{SUFFIX}.png")
    _image(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING):
        pairs = load_pair_dataset(tmp_path, SUFFIX, DataOptions(image_size=64, buckets_step=64, min_length=64))
    assert pairs.unmatched == [tmp_path / "b.png"]
    assert pairs.pairs == [(tmp_path / "a.png", tmp_path / f"a{SUFFIX}.png")]
    assert "b.png" in caplog.text


def test_size_mismatch_resizes_both_to_the_smaller_sides(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 96, value=10)
    _image(tmp_path / f"a{SUFFIX}.png", 80, 64, value=250)
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, disable_upscale=True)
    pairs = load_pair_dataset(tmp_path, SUFFIX, options)  # both become 64x64: no upscale needed
    (original,), (target,) = pairs.originals.samples, pairs.targets.samples
    assert original.pixels.shape == target.pixels.shape == (3, 64, 64)
    assert torch.allclose(original.pixels[1], target.pixels[1], atol=0.05)  # the whole ramp, squeezed alike
    assert original.pixels[0].mean() < -0.8 and target.pixels[0].mean() > 0.9


def test_both_sides_share_buckets_crops_mirroring_and_get_own_prompts(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 96, 64, value=10, caption="open eyes")
    _image(tmp_path / f"a{SUFFIX}.png", 96, 64, value=200, caption="closed eyes")
    _image(tmp_path / "b.png", 64, 64, value=30)
    _image(tmp_path / f"b{SUFFIX}.png", 64, 64, value=220)
    options = DataOptions(
        image_size=(96, 64), buckets_step=32, min_length=32, sub_image_num=1, mirroring=True, trigger_word="sks"
    )
    pairs = load_pair_dataset(tmp_path, SUFFIX, options)
    originals, targets = pairs.originals.samples, pairs.targets.samples
    assert len(originals) == len(targets) == 8 and len(pairs) == 8
    for original, target in zip(originals, targets):
        assert original.bucket == target.bucket
        assert torch.equal(original.pixels[1], target.pixels[1])  # identical ramp: same crop and flip
    assert pairs.originals.prompts == ["sks, open eyes", "sks"]
    assert pairs.targets.prompts == ["sks, closed eyes", "sks"]


def test_paired_latent_batches_stay_aligned(tmp_path: Path) -> None:
    for i, name in enumerate(["a", "b", "c"]):
        _image(tmp_path / f"{name}.png", value=10 + i, caption=f"orig {name}")
        _image(tmp_path / f"{name}{SUFFIX}.png", value=110 + i, caption=f"target {name}")
    rgba = np.asarray(Image.open(_image(tmp_path / "d.png")).convert("RGBA")).copy()
    rgba[:, 32:, 3] = 0  # right half transparent: masked out
    Image.fromarray(rgba).save(tmp_path / "d.png")
    _image(tmp_path / f"d{SUFFIX}.png", value=113, caption="target d")
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, mirroring=True)
    dataset = PairedLatentDataset.build(load_pair_dataset(tmp_path, SUFFIX, options), _encode)
    assert len(dataset) == 8
    assert set(dataset.prompts) == {"orig a", "orig b", "orig c", "", "target a", "target b", "target c", "target d"}
    generator = torch.Generator().manual_seed(0)
    masked = 0
    for _ in range(6):
        batch = dataset.sample_batch(3, generator)
        masked += int((batch.masks == 0).any(dim=(1, 2, 3)).sum())
        assert batch.original_latents.shape == batch.target_latents.shape == (3, 4, 8, 8)
        assert batch.masks.shape == (3, 1, 8, 8)
        for original_prompt, target_prompt in zip(batch.original_prompts, batch.target_prompts):
            assert target_prompt == "target " + (original_prompt.split()[-1] if original_prompt else "d")
        ramp = (batch.original_latents[:, 1] - batch.target_latents[:, 1]) * batch.masks[:, 0]  # same crop and flip
        assert torch.allclose(ramp, torch.zeros_like(ramp), atol=1e-6)
    assert masked > 0  # the transparent original's mask reached some batches
    assert dataset.summary().startswith("pairs: 8 samples from 4 images")
