"""Bucket sets and nearest-ratio choice, checked against the DESIGN.md seed example and the README counts."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traintrain.data import DataOptions, make_buckets, nearest_buckets, parse_image_size
from traintrain.errors import TrainTrainError

DESIGN_MAIN = [(384, 768), (512, 768), (512, 640), (512, 512), (640, 512), (768, 512), (768, 384)]
DESIGN_SUB = [
    (256, 512), (384, 640), (256, 384), (384, 512), (384, 384),
    (256, 256), (512, 384), (384, 256), (640, 384), (512, 256),
]  # fmt: skip


def test_design_example_buckets_exactly() -> None:
    main, sub = make_buckets("768,512", step=128, min_length=256, max_ratio=2.0)
    assert main == DESIGN_MAIN
    assert sub == DESIGN_SUB


def test_design_example_sub_images_of_a_512x640_image() -> None:
    _, sub = make_buckets((768, 512), 128, 256, 2.0)
    assert set(nearest_buckets((512, 640), sub, 3)) == {(384, 640), (256, 384), (384, 512)}


def test_ratio_tie_goes_to_the_larger_area() -> None:
    # 0.8 is exactly 0.2 from both 0.6 and 1.0; in floats 1.0 looks nearer, which would break the DESIGN example.
    assert abs(384 / 640 - 0.8) > abs(384 / 384 - 0.8)
    assert nearest_buckets((4, 5), [(384, 384), (384, 640)], 1) == [(384, 640)]
    assert nearest_buckets((4, 5), [(384, 640), (384, 384)], 1) == [(384, 640)]
    assert nearest_buckets((100, 100), [(256, 256), (384, 384)], 1) == [(384, 384)]


def test_main_bucket_is_nearest_ratio() -> None:
    main, _ = make_buckets("768,512", 128, 256, 2.0)
    assert nearest_buckets((1000, 480), main, 1) == [(768, 384)]
    assert nearest_buckets((300, 290), main, 1) == [(512, 512)]
    assert nearest_buckets((512, 640), main, 1) == [(512, 640)]


def test_defaults_give_one_square_bucket() -> None:
    assert DataOptions().buckets() == ([(512, 512)], [])


def test_768_512_step_256_gives_three_buckets() -> None:
    assert make_buckets("768,512", 256, 512, 2.0) == ([(512, 768), (512, 512), (768, 512)], [])


def test_min_length_512_gives_five_main_buckets_and_no_sub() -> None:
    main, sub = make_buckets("768,512", 128, 512, 2.0)
    assert len(main) == 5 and sub == []


def test_image_size_parsing() -> None:
    assert parse_image_size("768, 512") == (512, 768)
    assert parse_image_size("512") == (512, 512)
    assert parse_image_size(640) == (640, 640)
    assert parse_image_size((512, 768)) == (512, 768)


@pytest.mark.parametrize("size", ["abc", "0", "500", "512,512,512", (512, -8)])
def test_bad_image_size_raises(size: object) -> None:
    with pytest.raises(TrainTrainError, match="Image size"):
        parse_image_size(size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "min_length", "max_ratio", "match"),
    [(0, 512, 2.0, "step"), (-64, 512, 2.0, "step"), (100, 512, 2.0, "step"), (64, 0, 2.0, "min length"),
     (64, 500, 2.0, "min length"), (64, 512, 0.5, "max ratio")],
)  # fmt: skip
def test_bad_bucket_settings_raise(step: int, min_length: int, max_ratio: float, match: str) -> None:
    with pytest.raises(TrainTrainError, match=match):
        make_buckets(512, step, min_length, max_ratio)


def test_sub_images_without_sub_buckets_raise() -> None:
    with pytest.raises(TrainTrainError, match="no sub-image bucket"):
        DataOptions(sub_image_num=2).buckets()


@pytest.mark.parametrize(("field", "value"), [("sub_image_num", -1), ("num_multiply", 0)])
def test_bad_counts_raise(field: str, value: int) -> None:
    with pytest.raises(TrainTrainError):
        DataOptions(**{field: value})


@settings(max_examples=60, deadline=None)
@given(
    short=st.integers(4, 128).map(lambda v: v * 8),
    extra=st.integers(0, 64).map(lambda v: v * 8),
    step=st.integers(1, 32).map(lambda v: v * 8),
    min_length=st.integers(1, 96).map(lambda v: v * 8),
    max_ratio=st.floats(1.0, 4.0),
)
def test_bucket_invariants(short: int, extra: int, step: int, min_length: int, max_ratio: float) -> None:
    long = short + extra
    main, sub = make_buckets((short, long), step, min_length, max_ratio)
    assert (short, short) in main
    assert not set(main) & set(sub)
    for width, height in sub:
        assert width * height <= short * long
    for width, height in main + sub:
        assert width % 8 == 0 and height % 8 == 0 and 0 < width <= long and 0 < height <= long
        if (width, height) != (short, short):
            assert 1 / max_ratio <= width / height <= max_ratio
    ratios = [Fraction(w, h) for w, h in main]
    assert ratios == sorted(ratios)
