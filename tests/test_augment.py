"""Image tab augmentation: N seeded RGBA PNGs of the original size, from a file or a folder."""

import pytest
from PIL import Image, ImageChops

from traintrain.augment import AugmentSettings, augment_file, augment_folder, save_variants, variants
from traintrain.errors import TrainTrainError


def _square(size=(48, 32), mode="RGB"):
    image = Image.new(mode, size, (255, 255, 255))
    image.paste((200, 20, 20), (8, 8, 40, 24))
    return image


def test_file_gives_n_rgba_pngs_of_the_original_size(tmp_path):
    source = tmp_path / "shape.jpg"
    _square().save(source)
    paths = augment_file(source, tmp_path / "out", AugmentSettings(count=3, seed=1))
    assert [p.name for p in paths] == ["shape_id_0.png", "shape_id_1.png", "shape_id_2.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGBA" and image.size == (48, 32)
            assert image.getchannel("A").getextrema()[0] == 0  # shrunk or turned: some transparent canvas


def test_same_seed_same_images_and_sides(tmp_path):
    image = _square()
    first = variants(image, AugmentSettings(count=2, seed=7))
    again = variants(image, AugmentSettings(count=2, seed=7))
    assert all(ImageChops.difference(a, b).getbbox() is None for a, b in zip(first, again))
    (right,) = variants(image, AugmentSettings(count=1, rotate=False, min_scale=0.5, side="right", seed=3))
    left, top, right_edge, bottom = right.getchannel("A").getbbox()
    assert right_edge == 48 and left > 0


def test_no_change_keeps_the_image(tmp_path):
    (same,) = variants(_square(), AugmentSettings(count=1, rotate=False, scale=False))
    assert ImageChops.difference(same, _square().convert("RGBA")).getbbox() is None


def test_folder_writes_into_modified(tmp_path):
    _square().save(tmp_path / "a.png")
    _square(mode="RGBA").save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("x")
    paths = augment_folder(tmp_path, AugmentSettings(count=2))
    assert sorted(p.name for p in (tmp_path / "modified").iterdir()) == [
        "a_id_0.png",
        "a_id_1.png",
        "b_id_0.png",
        "b_id_1.png",
    ]
    assert len(paths) == 4


def test_bad_settings_and_names_are_refused(tmp_path):
    with pytest.raises(TrainTrainError, match="downscale"):
        variants(_square(), AugmentSettings(min_scale=0))
    with pytest.raises(TrainTrainError, match="fix side"):
        variants(_square(), AugmentSettings(side="middle"))
    with pytest.raises(TrainTrainError, match="outside"):
        save_variants(_square(), "../escape", tmp_path, AugmentSettings(count=1))
    with pytest.raises(TrainTrainError, match="not a folder"):
        augment_folder(tmp_path / "missing", AugmentSettings())


def test_disk_full_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    import errno

    import pytest
    from PIL import Image

    from traintrain.augment import AugmentSettings, save_variants
    from traintrain.errors import TrainTrainError

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(TrainTrainError, match="No space left on device"):
        save_variants(Image.new("RGBA", (32, 32)), "x", tmp_path, AugmentSettings(count=2))
    assert list(tmp_path.iterdir()) == []
