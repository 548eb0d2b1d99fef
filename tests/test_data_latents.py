"""Latent cache with a fake encoder: shapes, one bucket per batch, epoch coverage, determinism, masks, repeats."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from traintrain.data import DataOptions, LatentDataset, load_image_dataset
from traintrain.data.sampler import BucketSampler

PROJECTION = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
OPTIONS = DataOptions(image_size=(96, 64), buckets_step=32, min_length=64)  # buckets 64x96, 64x64, 96x64


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """Average-pool 8x8 then project RGB to 4 channels: (B,3,H,W) -> (B,4,H/8,W/8)."""
    return torch.einsum("oc,bchw->bohw", PROJECTION, F.avg_pool2d(pixels, 8))


def _image(path: Path, width: int, height: int, value: int, alpha: bool = False) -> None:
    array = np.full((height, width, 4 if alpha else 3), value, dtype=np.uint8)
    if alpha:
        array[:, :, 3] = 0
        array[:, : width // 2, 3] = 255
    Image.fromarray(array).save(path)
    path.with_suffix(".txt").write_text(f"{width}x{height} {value}")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        _image(tmp_path / f"square{i}.png", 64, 64, 20 + 10 * i)
    for i in range(2):
        _image(tmp_path / f"wide{i}.png", 96, 64, 100 + 10 * i)
    _image(tmp_path / "tall.png", 64, 96, 200)
    return tmp_path


def _build(folder: Path, options: DataOptions = OPTIONS, **kwargs: int) -> LatentDataset:
    return LatentDataset.build(load_image_dataset(folder, options), fake_encode, **kwargs)


def test_cache_shapes_and_values(folder: Path) -> None:
    images = load_image_dataset(folder, OPTIONS)
    first_square = images.samples[0].pixels.clone()
    dataset = LatentDataset.build(images, fake_encode, batch_size=2)
    assert images.samples == []  # nothing but the latents is kept
    shapes = {bucket: tuple(data.latents.shape) for bucket, data in dataset.buckets.items()}
    assert shapes == {(64, 96): (1, 4, 12, 8), (64, 64): (3, 4, 8, 8), (96, 64): (2, 4, 8, 12)}
    assert all(data.latents.dtype == torch.float16 for data in dataset.buckets.values())
    expected = fake_encode(first_square[None])[0]
    torch.testing.assert_close(dataset.buckets[(64, 64)].latents[0].float(), expected, atol=1e-3, rtol=1e-3)
    assert all(data.masks is None for data in dataset.buckets.values())
    assert len(dataset) == 6 and len(dataset.prompts) == 6
    assert dataset.summary() == "6 samples from 6 images in 3 buckets: 64x96: 1, 64x64: 3, 96x64: 2"


def test_batches_never_mix_buckets_and_match_their_prompts(folder: Path) -> None:
    dataset = _build(folder)
    generator = torch.Generator().manual_seed(0)
    seen = Counter()
    for _ in range(30):
        batch = dataset.sample_batch(2, generator)
        width, height = batch.bucket
        assert batch.latents.shape == (2, 4, height // 8, width // 8)
        assert all(prompt.startswith(f"{width}x{height} ") for prompt in batch.prompts)
        for latent, prompt in zip(batch.latents, batch.prompts):
            value = int(prompt.split()[1])
            assert torch.allclose(latent[0], torch.full_like(latent[0], value / 127.5 - 1), atol=1e-3)  # fp16 cache
        seen[batch.bucket] += 1
    assert set(seen) == {(64, 96), (64, 64), (96, 64)}


def test_one_epoch_visits_every_sample_once(folder: Path) -> None:
    dataset = _build(folder)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        epoch = [dataset.sample_batch(1, generator).prompts[0] for _ in range(6)]
        assert sorted(epoch) == sorted(dataset.prompts)


def test_same_seed_same_batches(folder: Path) -> None:
    def run(seed: int) -> list[tuple]:
        dataset, generator = _build(folder), torch.Generator().manual_seed(seed)
        return [(b.bucket, tuple(b.prompts)) for b in (dataset.sample_batch(2, generator) for _ in range(12))]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_small_bucket_is_filled_by_repetition(folder: Path) -> None:
    dataset = _build(folder)
    generator = torch.Generator().manual_seed(0)
    batches = [dataset.sample_batch(4, generator) for _ in range(12)]
    for batch in batches:
        assert len(batch.prompts) == 4 and batch.latents.shape[0] == 4
        assert len(set(batch.prompts)) == min(4, len(dataset.buckets[batch.bucket].prompts))
    tall = next(b for b in batches if b.bucket == (64, 96))
    assert tall.prompts == ["64x96 200"] * 4


def test_masks_per_bucket(folder: Path) -> None:
    _image(folder / "square_alpha.png", 64, 64, 90, alpha=True)
    dataset = _build(folder)
    masks = dataset.buckets[(64, 64)].masks
    prompts = dataset.buckets[(64, 64)].prompts
    assert masks.shape == (4, 1, 8, 8)
    alpha_row = prompts.index("64x64 90")
    expected = torch.zeros(1, 8, 8)
    expected[:, :, :4] = 1
    assert torch.equal(masks[alpha_row], expected)
    assert all(torch.equal(masks[i], torch.ones(1, 8, 8)) for i in range(4) if i != alpha_row)
    assert dataset.buckets[(96, 64)].masks is None
    batch = dataset.gather((64, 64), [alpha_row, 0])
    assert torch.equal(batch.masks[0], expected)


def test_repeats_show_in_the_epoch(folder: Path) -> None:
    options = DataOptions(image_size=(96, 64), buckets_step=32, min_length=64, num_multiply=2)
    dataset = _build(folder, options)
    assert len(dataset) == 12
    generator = torch.Generator().manual_seed(1)
    epoch = Counter(dataset.sample_batch(1, generator).prompts[0] for _ in range(12))
    assert set(epoch.values()) == {2}
    assert "repeated 2 times" in dataset.summary()


def test_sampler_weights_buckets_by_remaining_samples() -> None:
    generator = torch.Generator().manual_seed(0)
    firsts = Counter()
    for _ in range(400):
        sampler = BucketSampler({(64, 64): 9, (96, 64): 1})
        firsts[sampler.draw(1, generator)[0]] += 1
    assert 330 < firsts[(64, 64)] < 390  # expected 360 of 400


def test_sampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        BucketSampler({(64, 64): 0})
    with pytest.raises(ValueError):
        BucketSampler({(64, 64): 2}).draw(0, torch.Generator())


def test_batches_carry_each_images_size_and_crop(tmp_path: Path) -> None:
    _image(tmp_path / "wide.png", 97, 64, 50)  # covers the 64x64 bucket at 97x64: crop left 16, mirrored 17
    _image(tmp_path / "big.png", 128, 128, 90)  # resized to 64x64: no crop
    options = DataOptions(image_size=64, buckets_step=64, min_length=64, mirroring=True)
    dataset = _build(tmp_path, options)
    batch = dataset.gather((64, 64), [0, 1, 2, 3])
    assert batch.latents.dtype == torch.float32
    rows = {(prompt, tuple(row)) for prompt, row in zip(batch.prompts, batch.sizes.int().tolist())}
    assert rows == {
        ("128x128 90", (128, 128, 0, 0, 64, 64)),
        ("97x64 50", (64, 97, 0, 16, 64, 64)),
        ("97x64 50", (64, 97, 0, 17, 64, 64)),
    }


def test_streaming_decodes_each_image_once_and_refuses_nan_latents(folder: Path, monkeypatch) -> None:
    import traintrain.data.dataset as dataset_module
    from traintrain.errors import TrainTrainError

    images = load_image_dataset(folder, DataOptions(image_size=(96, 64), buckets_step=32, min_length=64, mirroring=True))
    loads = []
    real = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: loads.append(path) or real(path))
    LatentDataset.build(images, fake_encode)
    assert len(loads) == 6 == len(set(loads)), "one decode per source image, for the image and its mirror"
    images = load_image_dataset(folder, OPTIONS)
    with pytest.raises(TrainTrainError, match="train VAE precision"):
        LatentDataset.build(images, lambda pixels: fake_encode(pixels) / 0.0 * 0.0)
