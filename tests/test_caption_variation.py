"""Tag shuffling keeps the first N tags in place, tag and caption dropout drop the expected shares, and a LoRA
training sees the varied captions."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from traintrain.data.caption_variation import CaptionOptions, CaptionVariation, vary_caption
from traintrain.demo import demo_config, write_sample_images
from traintrain.models.tiny import build_tiny
from traintrain.modes import OutputDirs, RunContext, run_training

CAPTION = "trigger, 1girl, red hair, smile, outdoors, sky, tree, looking at viewer"
TAGS = [tag.strip() for tag in CAPTION.split(",")]


def test_nothing_set_leaves_the_caption_exactly_as_read():
    odd = "a  photo ,of, a cat "
    assert vary_caption(odd, CaptionOptions(), random.Random(0)) == odd


def test_shuffle_keeps_the_first_n_tags_in_place_and_permutes_the_rest():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        varied = vary_caption(CAPTION, CaptionOptions(shuffle=True, keep_tokens=2), rng).split(", ")
        assert varied[:2] == TAGS[:2] and sorted(varied[2:]) == sorted(TAGS[2:])
        seen.add(tuple(varied[2:]))
    assert len(seen) > 100
    positions = {vary_caption(CAPTION, CaptionOptions(shuffle=True), rng).split(", ").index("trigger") for _ in range(200)}
    assert len(positions) == len(TAGS), "without keep tokens the first tag moves too"


def test_caption_dropout_empties_the_expected_share():
    rng = random.Random(1)
    captions = [vary_caption(CAPTION, CaptionOptions(dropout_rate=0.3), rng) for _ in range(10000)]
    share = captions.count("") / len(captions)
    assert abs(share - 0.3) < 0.015
    assert all(c in ("", ", ".join(TAGS)) for c in captions)


def test_tag_dropout_drops_the_expected_share_and_never_the_kept_tags():
    rng = random.Random(2)
    options = CaptionOptions(keep_tokens=1, tag_dropout_rate=0.25)
    kept_counts = []
    for _ in range(4000):
        varied = vary_caption(CAPTION, options, rng).split(", ")
        assert varied[0] == "trigger" and [t for t in TAGS if t in varied] == varied  # order kept without shuffle
        kept_counts.append(len(varied) - 1)
    share_dropped = 1 - sum(kept_counts) / (len(kept_counts) * (len(TAGS) - 1))
    assert abs(share_dropped - 0.25) < 0.015


def test_variation_is_reproducible_with_its_seed():
    options = CaptionOptions(shuffle=True, tag_dropout_rate=0.2, dropout_rate=0.1)
    a, b = CaptionVariation(options, 7), CaptionVariation(options, 7)
    assert [a([CAPTION, CAPTION]) for _ in range(20)] == [b([CAPTION, CAPTION]) for _ in range(20)]
    assert [CaptionVariation(options, 8)([CAPTION]) for _ in range(20)] != [a([CAPTION]) for _ in range(20)]


def test_lora_training_encodes_the_varied_captions(tmp_path: Path):
    images = write_sample_images(tmp_path / "images")
    for caption in images.glob("*.txt"):
        caption.write_text("shape, colour, white background", encoding="utf-8")
    bundle = build_tiny("sd1")
    encoded: list[str] = []
    encode = bundle.encode_text
    bundle.encode_text = lambda prompts: encoded.extend(prompts) or encode(prompts)  # type: ignore[method-assign]
    config = dataclasses.replace(
        demo_config(images, iterations=20), logging_save_csv=False, network_blocks=["IN01", "OUT01"],
        caption_shuffle_tags=True, caption_keep_tokens=1, caption_dropout_rate=0.5,
    )  # fmt: skip
    result = run_training(RunContext(config, bundle, OutputDirs(tmp_path, tmp_path, tmp_path)))
    assert result.steps == 20 and len(encoded) == 40  # two prompts a step, encoded at each step
    assert 8 <= encoded.count("") <= 32
    spoken = [p.split(", ") for p in encoded if p]
    assert all(p[0] == "demo style" and sorted(p[1:]) == ["colour", "shape", "white background"] for p in spoken)
    assert len({tuple(p) for p in spoken}) >= 3, "the tags after the trigger word are shuffled"
