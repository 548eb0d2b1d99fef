"""TrainConfig: defaults, choices, the field table, validation, file-name sanitizing and the settings-JSON format."""

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traintrain.config import FIELD_BY_NAME, FIELDS, PASS_FIELDS, TrainConfig, sanitize_name
from traintrain.config_fields import (
    ALPHA_CHOICES,
    BLOCKS_SD,
    BLOCKS_SDXL,
    BUCKET_STEPS,
    CONV_ALPHA_CHOICES,
    CONV_RANK_CHOICES,
    ELEMENTS,
    LORA_PRECISIONS,
    LOSS_FUNCTIONS,
    LR_SCHEDULERS,
    MODEL_PRECISIONS,
    MODES,
    NETWORK_TYPES,
    OPTIMIZERS,
    RANK_CHOICES,
    SAVE_PRECISIONS,
    VAE_PRECISIONS,
    parse_settings_text,
    parse_step_rules,
    settings_text,
)
from traintrain.errors import TrainTrainError

# §3.2 of the reference, key:widget (DD dropdown, TX textbox, CH checkbox, CB checkbox group), in on-screen order.
ORIGINAL_KEYS = """
network_type:DD|network_rank:DD|network_alpha:DD|lora_data_directory:TX|diff_target_name:TX|lora_trigger_word:TX|
image_size(height, width):TX|train_iterations:TX|train_batch_size:TX|train_learning_rate:TX|train_optimizer:DD|
train_optimizer_settings:TX|train_lr_scheduler:DD|train_lr_scheduler_settings:TX|save_lora_name:TX|
use_gradient_checkpointing:CH|network_blocks(BASE = TextEncoder):CB|network_resume:TX|network_strength:TX|
network_conv_rank:DD|network_conv_alpha:DD|network_element:DD|network_train_text_encoder:CH|image_buckets_step:DD|
image_num_multiply:TX|image_min_length:TX|image_max_ratio:TX|sub_image_num:TX|image_mirroring:CH|
image_use_filename_as_tag:CH|image_disable_upscale:CH|train_fixed_timsteps_in_batch:CH|
train_textencoder_learning_rate:TX|train_seed:TX|train_min_timesteps:TX|train_max_timesteps:TX|
train_loss_function:DD|train_lr_step_rules:TX|train_lr_warmup_steps:TX|train_lr_scheduler_num_cycles:TX|
train_lr_scheduler_power:TX|train_snr_gamma:TX|save_per_steps:TX|diff_alt_ratio:TX|diff_revert_original_target:CH|
diff_use_diff_mask:CH|train_model_precision:DD|train_lora_precision:DD|save_precision:DD|train_VAE_precision:DD|
diff_load_1st_pass:TX|diff_save_1st_pass:CH|diff_1st_pass_only:CH|logging_save_csv:CH|logging_verbose:CH|
save_overwrite:CH|save_as_json:CH|model_v_pred:CH|use_2nd_pass_settings:CH
"""
WIDGET_CODES = {"DD": "dropdown", "TX": "textbox", "CH": "checkbox", "CB": "checkboxgroup"}
ORIGINAL = [(key, WIDGET_CODES[code]) for key, code in (item.strip().rsplit(":", 1) for item in ORIGINAL_KEYS.split("|"))]
RUN_KEYS = ("mode", "model", "vae", "original prompt", "target prompt")


def test_the_59_original_settings_are_fields_with_their_widgets_in_order():
    assert len(ORIGINAL) == 59
    specs = {spec.key: spec for spec in FIELDS}
    for key, widget in ORIGINAL:
        assert specs[key].widget == widget, key
        assert specs[key].label == key.replace("_", " ")
    order = [spec.key for spec in FIELDS if spec.key in dict(ORIGINAL)]
    assert order == [key for key, _ in ORIGINAL]


def test_defaults_match_the_original():
    c = TrainConfig()
    expected = dict(
        mode="LoRA", network_type="lierla", network_rank=16, network_alpha=8.0, image_size=(512, 512),
        train_iterations=1000, train_batch_size=2, train_learning_rate=1e-4, train_optimizer="AdamW",
        train_optimizer_settings={}, train_lr_scheduler="cosine", train_lr_scheduler_settings={}, save_lora_name="",
        network_blocks=list(BLOCKS_SD), network_strength=1.0, network_conv_rank=0, network_conv_alpha=0.0,
        network_element="Full", image_buckets_step=256, image_num_multiply=1, image_min_length=512,
        image_max_ratio=2.0, sub_image_num=0, train_textencoder_learning_rate=0.0, train_seed=-1,
        train_min_timesteps=0, train_max_timesteps=1000, train_loss_function="MSE", train_lr_step_rules="",
        train_lr_warmup_steps=0, train_lr_scheduler_num_cycles=1, train_lr_scheduler_power=1.0, train_snr_gamma=5.0,
        save_per_steps=0, diff_alt_ratio=1.0, train_model_precision="fp16", train_lora_precision="fp32",
        save_precision="fp16", train_VAE_precision="fp32", save_on_stop=True,
        use_gradient_checkpointing=False, use_2nd_pass_settings=False, second_pass=None,
    )  # fmt: skip
    for name, value in expected.items():
        assert getattr(c, name) == value, name
    assert c.effective_name == "untitled"
    for spec in FIELDS:
        assert spec.default == getattr(c, spec.name), spec.name


def test_choice_lists():
    assert MODES == ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
    assert NETWORK_TYPES == ("lierla", "c3lier", "loha") and ELEMENTS == ("Full", "CrossAttention", "SelfAttention")
    assert RANK_CHOICES == (4, 8, 16, 32, 64, 128, 256, 512, 1024) and CONV_RANK_CHOICES == (0, *RANK_CHOICES)
    assert ALPHA_CHOICES[0] == 0.03125 and ALPHA_CHOICES[-1] == 1024 and len(ALPHA_CHOICES) == 16
    assert all(b == 2 * a for a, b in zip(ALPHA_CHOICES, ALPHA_CHOICES[1:])) and CONV_ALPHA_CHOICES[0] == 0
    assert len(BLOCKS_SD) == 26 and BLOCKS_SD[:3] == ("BASE", "IN00", "IN01") and BLOCKS_SD[13:15] == ("M00", "OUT00")
    assert BLOCKS_SD[-1] == "OUT11" and len(BLOCKS_SDXL) == 20 and set(BLOCKS_SDXL) < set(BLOCKS_SD)
    assert BLOCKS_SDXL[-1] == "OUT08" and "IN09" not in BLOCKS_SDXL
    assert BUCKET_STEPS == (64, 128, 192, 256, 320, 384, 448, 512, 576)
    assert OPTIMIZERS == (
        "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad",
        "DAdaptAdan", "DAdaptSGD", "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit",
        "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree", "CAME", "Tiger", "AdamMini", "PagedAdamW",
        "PagedAdamW32bit", "SGDNesterov", "Adam",
    )  # fmt: skip
    assert set(LR_SCHEDULERS) == {
        "cosine_annealing", "cosine_annealing_with_restarts", "exponential", "step", "multi_step",
        "reduce_on_plateau", "cyclic", "one_cycle", "linear", "cosine", "cosine_with_restarts", "polynomial",
        "constant", "constant_with_warmup", "piecewise_constant",
    }  # fmt: skip
    assert LOSS_FUNCTIONS == ("MSE", "L1", "Smooth-L1")
    assert MODEL_PRECISIONS == ("model", "fp32", "bf16", "fp16", "int8") and SAVE_PRECISIONS == MODEL_PRECISIONS[:-1]
    assert LORA_PRECISIONS == VAE_PRECISIONS == ("fp32", "bf16", "fp16")


def test_field_table_is_consistent():
    codes = {"L", "I", "D", "P2", "A", "M"}
    for spec in FIELDS:
        assert set(spec.shown_in) <= codes, spec.name
        if spec.choices and spec.widget == "dropdown":
            assert spec.default in spec.choices, spec.name
    assert FIELD_BY_NAME["network_rank"].shown("LoRA") and FIELD_BY_NAME["network_rank"].shown("", second_pass=True)
    assert FIELD_BY_NAME["diff_target_name"].shown("Multi-ADDifT") and not FIELD_BY_NAME["diff_target_name"].shown("LoRA")
    assert FIELD_BY_NAME["use_2nd_pass_settings"].shown_in == ("P2",)
    assert FIELD_BY_NAME["image_size"].key == "image_size(height, width)"
    assert FIELD_BY_NAME["network_blocks"].choices == BLOCKS_SD
    assert not FIELD_BY_NAME["negative_prompt"].saved
    assert {spec.name for spec in FIELDS if not spec.per_pass} == {
        "mode", "model", "vae", "original_prompt", "target_prompt", "negative_prompt", "original_image", "target_image"
    }  # fmt: skip
    assert FIELD_BY_NAME["network_rank"].parse("32") == 32 and FIELD_BY_NAME["network_alpha"].raw(0.5) == "0.5"


def test_validate_lists_every_problem_at_once(tmp_path):
    config = TrainConfig(
        network_rank=0, network_alpha=-1, train_iterations=0, train_batch_size="2", train_learning_rate=0.0,
        train_min_timesteps=900, train_max_timesteps=100, image_size=(500, 512), network_type="loha",
        network_element="SelfAttention", train_optimizer="NoSuchOpt", image_buckets_step=0, network_blocks=[],
        lora_data_directory=str(tmp_path / "missing"), save_lora_name=" ... ",
    )  # fmt: skip
    with pytest.raises(TrainTrainError) as error:
        config.validate()
    lines = str(error.value).splitlines()[1:]
    for fragment in ["network rank", "network alpha", "train iterations", "train batch size' must be a whole",
                     "min < max", "multiples of 8", "not available with loha", "train optimizer' must be one of",
                     "image buckets step", "network blocks' is empty", "lora data directory", "no usable characters",
                     "learning rate' must be above 0"]:
        assert sum(fragment in line for line in lines) == 1, fragment
    assert len(lines) == 13


def test_validate_accepts_good_settings_and_checks_each_mode(tmp_path):
    (tmp_path / "data").mkdir()
    TrainConfig(lora_data_directory=str(tmp_path / "data")).validate()
    TrainConfig(mode="iLECO", original_prompt="mona lisa").validate()
    with pytest.raises(TrainTrainError, match="Original Prompt"):
        TrainConfig(mode="iLECO").validate()
    with pytest.raises(TrainTrainError, match="diff target name"):
        TrainConfig(mode="Multi-ADDifT", lora_data_directory=str(tmp_path / "data")).validate()
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    with pytest.raises(TrainTrainError, match="Target Image") as error:
        TrainConfig(mode="ADDifT", original_image=str(image), target_image=str(tmp_path / "b.png")).validate()
    assert "Original Image" not in str(error.value)
    TrainConfig(mode="Difference", original_image=str(image), target_image=str(image)).validate()


def test_learning_rate_rules_depend_on_the_optimizer():
    base = dict(mode="iLECO", original_prompt="x", train_learning_rate=0.0)
    TrainConfig(**base, train_optimizer="adafactor").validate()  # relative_step: Adafactor sets its own lr
    for optimizer in ("AdamW", "Prodigy"):
        with pytest.raises(TrainTrainError, match="learning rate' must be above 0"):
            TrainConfig(**base, train_optimizer=optimizer).validate()
    with pytest.raises(TrainTrainError, match="learning rate"):
        TrainConfig(**base, train_optimizer="AdaFactor", train_optimizer_settings={"relative_step": False}).validate()
    with pytest.raises(TrainTrainError, match="piecewise_constant needs"):
        TrainConfig(mode="iLECO", original_prompt="x", train_lr_scheduler="piecewise_constant").validate()


def test_second_pass_is_validated_with_a_prefix(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    second = TrainConfig(network_rank=0, original_image="ignored: comes from pass 1")
    config = TrainConfig(mode="Difference", original_image=str(image), target_image=str(image), second_pass=second)
    assert config.second_pass.original_image == str(image)
    with pytest.raises(TrainTrainError) as error:
        config.validate()
    assert str(error.value).splitlines()[1:] == ["- 2nd pass: 'network rank' must be at least 1, not 0."]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_sanitized_names_stay_inside_their_folder(name):
    folder = Path("/tmp/traintrain-loras").resolve()
    clean = sanitize_name(name)
    path = Path(folder, clean + ".safetensors").resolve()
    assert path.parent == folder
    assert clean and clean == clean.strip(" .") and not set(clean) & set('/\\:*?"<>|\0')
    assert len(clean) <= 121 and len(clean.encode("utf-8")) <= 181
    assert sanitize_name(clean) == clean


@pytest.mark.parametrize(
    "name, clean",
    [
        ("", "untitled"), ("..", "untitled"), ("../../etc/passwd", "_._etc_passwd"), ("a\\b", "a_b"), ("CON", "_CON"),
        ("con.txt", "_con.txt"), ("LPT9.tar.gz", "_LPT9.tar.gz"), ("com1 ", "_com1"), ("Console", "Console"),
        (".hidden", "hidden"), ("name. . ", "name"), ("tab\there", "tab_here"), ("x" * 300, "x" * 120), ("日本語", "日本語"), ("a\ud800b", "a_b"),
    ],
)  # fmt: skip
def test_sanitize_name_examples(name, clean, tmp_path):
    assert sanitize_name(name) == clean
    (tmp_path / f"{sanitize_name(name)}.safetensors").write_bytes(b"")


def test_effective_name_and_seed():
    assert TrainConfig(save_lora_name="my/lora").effective_name == "my_lora"
    assert TrainConfig(train_seed=7).resolved_seed() == 7
    config = TrainConfig()
    seed = config.resolved_seed()
    assert 0 <= seed < 2**32 and config.resolved_seed() == seed and config.train_seed == -1


def test_settings_text_parsing():
    text = "weight_decay=0.01\nbetas=(0.9, 0.99); eps = 1e-8;mode=triangular2\n quote='a;b=c'\n\n"
    parsed = parse_settings_text(text)
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "mode": "triangular2", "quote": "a;b=c"}
    assert parse_settings_text(settings_text(parsed)) == parsed
    assert parse_settings_text("") == {} and parse_settings_text("eta_min=0.00001") == {"eta_min": 1e-5}
    assert parse_settings_text("milestones=[10, 20]; flag=True; none=None") == {
        "milestones": [10, 20], "flag": True, "none": None
    }  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["x=__import__('os')", "x=__import__('os').system('echo hi')", "x=open('f')", "x=(lambda: 1)()", "x=1+a",
     "1x=3", "=3", "x", "class=3", "x=3;x=4", "x=[1, 2"],
)  # fmt: skip
def test_settings_text_refuses_code_and_nonsense(text):
    with pytest.raises(TrainTrainError):
        parse_settings_text(text)
    with pytest.raises(TrainTrainError, match="train optimizer settings"):
        TrainConfig.from_json_dict({"train_optimizer_settings": text})


def test_step_rules():
    assert parse_step_rules("1:3,0.5:6,0.1") == (((1.0, 3), (0.5, 6)), 0.1)
    assert parse_step_rules("0.5") == ((), 0.5)
    for bad in ("", "1:3,0.5:", "1:6,0.5:3,0.1", "a:3,1", "1:0,1", "1:3:4,1", "1,2", "1:3,nan"):
        with pytest.raises(TrainTrainError, match="step rules"):
            parse_step_rules(bad)


# An original-format preset written by hand from §4.1 / §4.2 (LoRA.json shape: older, some keys missing).
ORIGINAL_LORA_PRESET = {
    "network_type": "lierla", "network_rank": "16", "network_alpha": "8", "lora_data_directory": "",
    "lora_trigger_word": "", "image_size(height, width)": "512", "train_iterations": "1000", "train_batch_size": "2",
    "train_learning_rate": "1e-4", "train_optimizer": "adamw", "train_lr_scheduler": "cosine", "save_lora_name": "",
    "use_gradient_checkpointing": False, "network_blocks(BASE = TextEncoder)": list(BLOCKS_SD),
    "network_conv_rank": "0", "network_conv_alpha": "0", "network_element": "Full", "image_buckets_step": "256",
    "image_min_length": "512", "image_max_ratio": "2", "sub_image_num": "0", "image_mirroring": False,
    "train_fixed_timsteps_in_batch": False, "train_textencoder_learning_rate": "", "train_seed": "-1",
    "train_lr_step_rules": "", "train_lr_warmup_steps": "0", "train_lr_scheduler_num_cycles": "1",
    "train_lr_scheduler_power": "1.0", "train_snr_gamma": "5", "save_per_steps": "0", "train_model_precision": "fp16",
    "train_lora_precision": "fp32", "save_precision": "fp16", "diff_load_1st_pass": "", "diff_save_1st_pass": False,
    "diff_1st_pass_only": False, "logging_save_csv": "", "logging_verbose": False, "save_overwrite": False,
    "save_as_json": False, "model_v_pred": False, "use_2nd_pass_settings": False, "mode": "LoRA", "model": "",
    "vae": "None", "original prompt": "", "target prompt": "",
}  # fmt: skip


def test_original_lora_preset_loads_as_the_defaults(tmp_path):
    path = tmp_path / "LoRA.json"
    path.write_text(json.dumps(ORIGINAL_LORA_PRESET, indent=4), encoding="utf-8")
    config = TrainConfig.load_json(path)
    assert config == TrainConfig() and config.unknown_keys == ()
    written = config.to_json_dict()
    for key, value in ORIGINAL_LORA_PRESET.items():  # the same format, value for value (numbers as text)
        if key not in ("train_optimizer", "vae", "logging_save_csv", "train_learning_rate", "image_max_ratio",
                       "train_lr_scheduler_power"):  # fmt: skip
            assert written[key] == value, key
    assert written["train_optimizer"] == "AdamW" and written["vae"] == "" and written["logging_save_csv"] is False
    assert float(written["train_learning_rate"]) == 1e-4 and "2nd pass" not in written


def test_addift_style_preset_values():
    data = {
        **ORIGINAL_LORA_PRESET, "mode": "ADDifT", "network_rank": "4", "network_alpha": "1",
        "train_optimizer": "CAME", "train_lr_scheduler": "cosine_annealing",
        "train_lr_scheduler_settings": "eta_min=0.00001", "network_strength": "2.0", "diff_alt_ratio": "1.0",
        "train_min_timesteps": "200", "train_max_timesteps": "400", "train_snr_gamma": "1.0",
        "diff_revert_original_target": True, "network_blocks(BASE = TextEncoder)": ["OUT01", "IN00", "M00", "OUT05"],
        "te": "None", "train_seed": "1",
    }  # fmt: skip
    config = TrainConfig.from_json_dict(data)
    assert config.mode == "ADDifT" and config.network_rank == 4 and config.network_alpha == 1.0
    assert config.train_lr_scheduler_settings == {"eta_min": 1e-5} and config.network_strength == 2.0
    assert (config.train_min_timesteps, config.train_max_timesteps) == (200, 400) and config.resolved_seed() == 1
    assert config.network_blocks == ["IN00", "M00", "OUT01", "OUT05"] and config.unknown_keys == ()


def test_difference_with_and_without_2nd_pass():
    second = {k: v for k, v in ORIGINAL_LORA_PRESET.items() if k not in RUN_KEYS}
    second.update(network_rank="4", network_alpha="4", train_learning_rate="1e-4", use_2nd_pass_settings=False)
    data = {**ORIGINAL_LORA_PRESET, "mode": "Difference", "network_alpha": "16", "train_learning_rate": "5e-4",
            "save_lora_name": "Difference_Use2ndPass", "use_2nd_pass_settings": True, "2nd pass": second}
    config = TrainConfig.from_json_dict(data)
    assert config.use_2nd_pass_settings and config.network_alpha == 16 and config.train_learning_rate == 5e-4
    two = config.second_pass
    assert (two.network_rank, two.network_alpha, two.train_learning_rate) == (4, 4.0, 1e-4)
    assert two.save_lora_name == "Difference_Use2ndPass" and not two.use_2nd_pass_settings and two.second_pass is None
    assert TrainConfig.from_json_dict(config.to_json_dict()) == config
    copied = TrainConfig.from_json_dict({k: v for k, v in data.items() if k != "2nd pass"})
    assert copied.second_pass == TrainConfig.from_json_dict({**data, "2nd pass": None}).second_pass
    assert copied.second_pass.network_rank == 16 and copied.second_pass.train_learning_rate == 5e-4
    assert "2nd pass" in copied.to_json_dict() and "2nd pass" not in TrainConfig().to_json_dict()


def test_typed_values_unknown_keys_and_wrong_types(caplog):
    config = TrainConfig.from_json_dict(
        {"network_rank": 32, "train_learning_rate": 0.001, "image_size(height, width)": [768, 512],
         "logging_save_csv": True, "train_optimizer": "PRODIGY", "bogus": 1, "2nd pass": {"x": 1}}
    )  # fmt: skip
    assert (config.network_rank, config.train_learning_rate, config.image_size) == (32, 0.001, (512, 768))
    assert config.logging_save_csv and config.train_optimizer == "Prodigy"
    with caplog.at_level(logging.WARNING):
        assert TrainConfig.from_json_dict({"bogus": 1, "mode": "lora"}).unknown_keys == ("bogus",)
    assert "bogus" in caplog.text
    with pytest.raises(TrainTrainError) as error:
        TrainConfig.from_json_dict(
            {"network_rank": {"a": 1}, "train_iterations": "many", "image_mirroring": "yes", "model": 3,
             "network_blocks(BASE = TextEncoder)": 5, "image_size(height, width)": "1,2,3", "mode": "Difference",
             "2nd pass": "nope"}
        )  # fmt: skip
    assert len(str(error.value).splitlines()) == 1 + 7
    with pytest.raises(TrainTrainError, match="JSON object"):
        TrainConfig.from_json_dict(["not", "a", "dict"])


def test_json_files(tmp_path):
    config = TrainConfig(mode="iLECO", original_prompt="red", negative_prompt="blurry", train_optimizer="lion")
    path = config.save_json(tmp_path / "sub" / "run.json")
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temp file left
    assert TrainConfig.load_json(path) == dataclasses.replace(config, negative_prompt="")  # never saved
    (tmp_path / "bad.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(TrainTrainError, match="not valid JSON"):
        TrainConfig.load_json(tmp_path / "bad.json")
    with pytest.raises(TrainTrainError, match="Cannot read"):
        TrainConfig.load_json(tmp_path / "missing.json")


_FINITE = st.floats(allow_nan=False, allow_infinity=False)
_LITERALS = st.one_of(st.none(), st.booleans(), st.integers(), _FINITE, st.text())
_SETTINGS = st.dictionaries(
    st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda k: k not in ("if", "in", "is", "or", "as")),
    st.one_of(_LITERALS, st.tuples(_LITERALS, _LITERALS), st.lists(_LITERALS, max_size=3)),
    max_size=3,
)
_BY_TYPE = {
    int: st.integers(-(10**9), 10**9),
    float: _FINITE,
    str: st.text(),
    bool: st.booleans(),
    list: st.sets(st.sampled_from(BLOCKS_SD)).map(lambda blocks: [b for b in BLOCKS_SD if b in blocks]),
    tuple: st.tuples(st.integers(8, 4096), st.integers(8, 4096)),
    dict: _SETTINGS,
}


def _values(with_mode: bool):
    specs = FIELDS if with_mode else PASS_FIELDS
    strategies = {
        spec.name: st.sampled_from(spec.choices) if spec.type is str and spec.choices else _BY_TYPE[spec.type]
        for spec in specs
        if spec.saved
    }
    return st.fixed_dictionaries(strategies)


@st.composite
def configs(draw):
    values = draw(_values(with_mode=True))
    second = TrainConfig(**draw(_values(with_mode=False))) if values["mode"] == "Difference" else None
    return TrainConfig(**values, second_pass=second)


@settings(max_examples=150, deadline=None)
@given(configs())
def test_json_round_trip_is_lossless(config):
    data = json.loads(json.dumps(config.to_json_dict()))
    assert TrainConfig.from_json_dict(data) == config
    assert all(isinstance(v, (str, bool, list, dict)) for v in data.values())
    assert not math.isnan(config.train_learning_rate)


def test_image_size_text():
    spec = FIELD_BY_NAME["image_size"]
    assert spec.parse("512") == (512, 512) and spec.parse("768,512") == (512, 768) and spec.parse(" 640 , 512") == (
        512, 640)  # fmt: skip
    assert spec.raw((512, 512)) == "512" and spec.raw((512, 768)) == "512,768"
    assert TrainConfig(image_size=(768, 512)).image_size == (512, 768)
