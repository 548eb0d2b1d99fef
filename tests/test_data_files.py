"""Image discovery and prompts: extensions, hidden files, errors, caption priority, trigger word, tag counts."""

import re
from pathlib import Path

import pytest
from PIL import Image

from traintrain.data import discover_images, image_prompt, join_prompt, tag_frequency
from traintrain.data.captions import filename_tags
from traintrain.errors import TrainTrainError


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, format="PNG")
    return path


def test_discovery_is_recursive_case_insensitive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    found = [
        _touch_image(tmp_path / name)
        for name in ["b.PNG", "a.jpg", "sub/c.JpEg", "sub/deeper/d.webp", "e.Tiff", "f.bmp", "g.gif", "h.ico"]
    ]
    for ignored in [".hidden.png", ".cache/x.png", "notes.txt", "model.safetensors", "pngfile"]:
        _touch_image(tmp_path / ignored)
    result = discover_images(tmp_path)
    assert result == sorted(found, key=lambda p: p.relative_to(tmp_path).as_posix())
    assert [p.name for p in result][:2] == ["a.jpg", "b.PNG"]


def test_missing_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(TrainTrainError, match="nowhere.*does not exist"):
        discover_images(tmp_path / "nowhere")


def test_unset_folder_raises() -> None:
    with pytest.raises(TrainTrainError, match="No data folder"):
        discover_images("  ")


def test_folder_without_images_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(TrainTrainError, match=re.escape(f"No images found in {tmp_path}")):
        discover_images(tmp_path)


def test_txt_caption_wins_over_caption_file_and_is_stripped(tmp_path: Path) -> None:
    image = _touch_image(tmp_path / "cat.png")
    (tmp_path / "cat.caption").write_text("from caption")
    assert image_prompt(image, "") == "from caption"
    (tmp_path / "cat.txt").write_text("  a cat, sitting \n")
    assert image_prompt(image, "") == "a cat, sitting"
    assert image_prompt(image, "sks") == "sks, a cat, sitting"


def test_trigger_rules(tmp_path: Path) -> None:
    image = _touch_image(tmp_path / "dog.png")
    assert image_prompt(image, "sks") == "sks"
    assert image_prompt(image, "") == ""
    assert join_prompt("", "a dog") == "a dog"
    assert join_prompt("  sks ", " a dog ") == "sks, a dog"
    (tmp_path / "dog.txt").write_text("   ")
    assert image_prompt(image, "sks") == "sks"


def test_filename_as_tag(tmp_path: Path) -> None:
    assert filename_tags("1girl_red_hair_id_0042_x") == "1girl,red,hair"
    assert filename_tags("solo") == "solo"
    image = _touch_image(tmp_path / "blue_sky_id_7.png")
    (tmp_path / "blue_sky_id_7.txt").write_text("ignored caption")
    assert image_prompt(image, "sks", use_filename_as_tag=True) == "sks, blue,sky"
    assert image_prompt(image, "", use_filename_as_tag=True) == "blue,sky"


def test_tag_frequency_counts_stripped_tags_including_trigger() -> None:
    prompts = ["sks, a cat,  sitting", "sks,a cat", "sks", ""]
    assert tag_frequency(prompts) == {"sks": 3, "a cat": 2, "sitting": 1}
    assert list(tag_frequency(prompts)) == ["sks", "a cat", "sitting"]
