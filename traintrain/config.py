"""TrainConfig: every training setting with its default, its validation, and the settings-JSON format.

The dataclass fields carry their UI details (widget, modes, choices); `FIELDS` is the table built from them.
The JSON format is the original extension's flat one (raw UI values), so presets of both are interchangeable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

from traintrain.config_fields import (
    ALPHA_CHOICES,
    BLOCKS_SD,
    BUCKET_STEPS,
    CHECKBOX,
    CHECKBOXGROUP,
    CONV_ALPHA_CHOICES,
    CONV_RANK_CHOICES,
    DROPDOWN,
    ELEMENTS,
    IMAGE,
    LORA_PRECISIONS,
    LOSS_FUNCTIONS,
    LR_SCHEDULERS,
    MODEL_PRECISIONS,
    MODES,
    NETWORK_TYPES,
    OPTIMIZERS,
    RADIO,
    RANK_CHOICES,
    SAVE_PRECISIONS,
    SECOND_PASS_CODE,
    TEXTAREA,
    TEXTBOX,
    VAE_PRECISIONS,
    FieldSpec,
    canonical_choice,
    own_learning_rate,
    parse_step_rules,
    sanitize_name,
)
from traintrain.errors import TrainTrainError
from traintrain.files import atomic_write_text, is_dir, is_file, read_json

log = logging.getLogger(__name__)

ALL = ("L", "I", "D", "P2", "A", "M")  # every mode and the Difference 2nd-pass panel
EVERY_MODE = ("L", "I", "D", "A", "M")  # every mode; pass 2 takes the 1st pass's value

# Upper bounds of the numeric settings: far above any useful value, low enough that nothing hangs or overflows.
MAX_RANK = 1024  # rank and alpha, conv included (the dropdowns' largest choice)
MAX_IMAGE_SIDE = 4096  # image size sides, min length and bucket step
MAX_STEPS = 1_000_000  # iterations, warmup, cycles and save-every
MAX_BATCH = 256
MAX_REPEATS = 1000  # image num multiply
MAX_SUB_IMAGES = 100
MAX_RATIO = 16.0  # image max ratio
MAX_LEARNING_RATE = 10.0
MAX_STRENGTH = 100.0  # |network strength|
MAX_FACTOR = 1000.0  # scheduler power, SNR gamma, |diff alt ratio|


def setting(default: Any, widget: str, shown_in: tuple[str, ...], *, section: str, column: int = 0, **spec: Any) -> Any:
    """A dataclass field that carries its FieldSpec details (key, label, choices, help, saved, blank)."""
    metadata = {"spec": {"widget": widget, "shown_in": shown_in, "section": section, "column": column, **spec}}
    if isinstance(default, (list, dict)):
        return field(default_factory=partial(type(default), default), metadata=metadata)
    return field(default=default, metadata=metadata)


_general = partial(setting, section="general")
_req1, _req2, _req3 = (partial(setting, section="required", column=n) for n in (1, 2, 3))
_opt1, _opt2, _opt3 = (partial(setting, section="options", column=n) for n in (1, 2, 3))
_prompt = partial(setting, section="prompts")
_image = partial(setting, section="images")


@dataclass
class TrainConfig:
    """Every setting of one training run; Difference mode's 2nd pass lives in `second_pass`."""

    mode: str = _general("LoRA", RADIO, EVERY_MODE, label="Mode", choices=MODES)
    model: str = _general("", DROPDOWN, EVERY_MODE, label="Model", help="Empty: the WebUI's loaded model (CLI: --model).")
    vae: str = _general("", DROPDOWN, EVERY_MODE, label="VAE", help="Empty or None: the model's own VAE.")
    network_type: str = _req1("lierla", DROPDOWN, ALL, choices=NETWORK_TYPES)
    network_rank: int = _req1(16, DROPDOWN, ALL, choices=RANK_CHOICES)
    network_alpha: float = _req1(8.0, DROPDOWN, ALL, choices=ALPHA_CHOICES)
    lora_data_directory: str = _req1("", TEXTBOX, ("L", "M"), help="Folder of images (+ .txt captions), recursive.")
    diff_target_name: str = _req1("", TEXTBOX, ("M",), help="Target suffix: image1.png pairs with image1_closed_eyes.png.")
    lora_trigger_word: str = _req1("", TEXTBOX, ("L", "D", "A", "M"))
    image_size: tuple[int, int] = _req2(
        (512, 512), TEXTBOX, ("L", "I", "M"), key="image_size(height, width)", help="N or A,B (sorted ascending)."
    )
    train_iterations: int = _req2(1000, TEXTBOX, ALL)
    train_batch_size: int = _req2(2, TEXTBOX, ALL)
    train_learning_rate: float = _req2(1e-4, TEXTBOX, ALL)
    train_optimizer: str = _req3("AdamW", DROPDOWN, ALL, choices=OPTIMIZERS)
    train_optimizer_settings: dict[str, Any] = _req3({}, TEXTBOX, ALL, help="key=value per line or ';'-separated.")
    train_lr_scheduler: str = _req3("cosine", DROPDOWN, ALL, choices=LR_SCHEDULERS)
    train_lr_scheduler_settings: dict[str, Any] = _req3({}, TEXTBOX, ALL, help="key=value per line or ';'-separated.")
    save_lora_name: str = _req3("", TEXTBOX, EVERY_MODE, help="File name; empty: untitled.")
    use_gradient_checkpointing: bool = _req3(False, CHECKBOX, ALL)
    use_cuda_graph: bool = _opt3(
        True,
        CHECKBOX,
        ALL,
        help="GPU: replay each training step as a CUDA graph (much faster; AdamW / Adam). "
        "Off: eager steps, which need less memory when there are several image sizes.",
    )
    use_torch_compile: bool = _opt3(
        False, CHECKBOX, ALL, help="Compile the model step with torch.compile: faster, each image size compiles first."
    )
    network_blocks: list[str] = setting(
        list(BLOCKS_SD), CHECKBOXGROUP, ALL, section="blocks", key="network_blocks(BASE = TextEncoder)", choices=BLOCKS_SD
    )
    network_resume: str = _opt1("", TEXTBOX, ("L", "D", "M"), help="Full path of a LoRA to continue training.")
    network_strength: float = _opt1(1.0, TEXTBOX, ALL, help="Scales the saved weights.")
    network_conv_rank: int = _opt1(0, DROPDOWN, ALL, choices=CONV_RANK_CHOICES, help="0: network rank.")
    network_conv_alpha: float = _opt1(0.0, DROPDOWN, ALL, choices=CONV_ALPHA_CHOICES, help="0: network alpha.")
    network_element: str = _opt1("Full", DROPDOWN, ALL, choices=ELEMENTS)
    network_train_text_encoder: bool = _opt1(
        False, CHECKBOX, (), help="Kept for preset compatibility, no effect: tick BASE in network blocks instead."
    )
    image_buckets_step: int = _opt1(256, DROPDOWN, ("L", "M"), choices=BUCKET_STEPS)
    image_num_multiply: int = _opt1(1, TEXTBOX, ("L", "M"))
    image_min_length: int = _opt1(512, TEXTBOX, ("L", "M"))
    image_max_ratio: float = _opt1(2.0, TEXTBOX, ("L", "M"))
    sub_image_num: int = _opt1(0, TEXTBOX, ("L", "M"))
    image_mirroring: bool = _opt1(False, CHECKBOX, ("L", "M"))
    image_use_filename_as_tag: bool = _opt1(False, CHECKBOX, ("L", "M"))
    image_disable_upscale: bool = _opt1(False, CHECKBOX, ("L", "M"))
    train_fixed_timsteps_in_batch: bool = _opt1(False, CHECKBOX, ALL)
    train_textencoder_learning_rate: float = _opt2(
        0.0, TEXTBOX, ("L",), blank=True, help="Blank or 0: train learning rate."
    )
    train_seed: int = _opt2(-1, TEXTBOX, ALL, help="-1: random.")
    train_min_timesteps: int = _opt2(0, TEXTBOX, ALL)
    train_max_timesteps: int = _opt2(1000, TEXTBOX, ALL, help="Exclusive upper bound, at most 1000.")
    train_loss_function: str = _opt2("MSE", DROPDOWN, ALL, choices=LOSS_FUNCTIONS)
    train_lr_step_rules: str = _opt2("", TEXTBOX, ALL, help="piecewise_constant only, e.g. 1:3,0.5:6,0.1.")
    train_lr_warmup_steps: int = _opt2(0, TEXTBOX, ALL, help="linear … piecewise_constant schedulers only.")
    train_lr_scheduler_num_cycles: int = _opt2(1, TEXTBOX, ALL, help="cosine_with_restarts.")
    train_lr_scheduler_power: float = _opt2(1.0, TEXTBOX, ALL, help="polynomial.")
    train_snr_gamma: float = _opt2(5.0, TEXTBOX, ALL, help="Min-SNR weighting; 0: off.")
    save_per_steps: int = _opt2(0, TEXTBOX, ALL, help="0: only at the end.")
    diff_alt_ratio: float = _opt2(1.0, TEXTBOX, ("A", "M"), help="Below 0: pure-noise odd steps.")
    diff_revert_original_target: bool = _opt2(False, CHECKBOX, ("A", "M"))
    diff_use_diff_mask: bool = _opt2(False, CHECKBOX, ("A", "M"))
    train_model_precision: str = _opt3(
        "fp16", DROPDOWN, EVERY_MODE, choices=MODEL_PRECISIONS,
        help="int8: int8 UNet weights (torchao; standalone UI / CLI), computed in fp16.",
    )  # fmt: skip
    train_lora_precision: str = _opt3("fp32", DROPDOWN, ALL, choices=LORA_PRECISIONS)
    save_precision: str = _opt3("fp16", DROPDOWN, ALL, choices=SAVE_PRECISIONS)
    train_VAE_precision: str = _opt3("fp32", DROPDOWN, EVERY_MODE, choices=VAE_PRECISIONS)
    diff_load_1st_pass: str = _opt3("", TEXTBOX, ("D",), help="A copy-machine LoRA in the Lora folder: skips pass 1.")
    diff_save_1st_pass: bool = _opt3(False, CHECKBOX, ("D",))
    diff_1st_pass_only: bool = _opt3(False, CHECKBOX, ("D",))
    logging_save_csv: bool = _opt3(False, CHECKBOX, EVERY_MODE)
    logging_verbose: bool = _opt3(False, CHECKBOX, EVERY_MODE)
    save_overwrite: bool = _opt3(False, CHECKBOX, EVERY_MODE)
    save_as_json: bool = _opt3(False, CHECKBOX, EVERY_MODE)
    model_v_pred: bool = _opt3(False, CHECKBOX, EVERY_MODE, help="v-prediction model (SD2 768-v, v-pred SDXL).")
    save_on_stop: bool = _opt3(True, CHECKBOX, EVERY_MODE, help="When a training is interrupted (WebUI Interrupt, Ctrl-C, shutdown), save the LoRA so far as <name>_<k>steps (the copy machine: <name>_copy_<k>steps).")
    clip_skip: int = _opt3(
        1, TEXTBOX, EVERY_MODE, help="SD1: condition on the N-th text-encoder layer from the last (anime models: 2). "
        "1: the last layer, or in the WebUI its own Clip skip setting."
    )
    use_2nd_pass_settings: bool = setting(
        False, CHECKBOX, (SECOND_PASS_CODE,), section="second pass", help="Stored on the 1st-pass config."
    )
    original_prompt: str = _prompt("", TEXTAREA, ("I", "D", "A"), key="original prompt", label="Original Prompt")
    target_prompt: str = _prompt(
        "", TEXTAREA, ("I", "D", "A"), key="target prompt", label="Target Prompt", help="iLECO: empty = erase."
    )
    negative_prompt: str = _prompt(
        "", TEXTAREA, ("I",), key="negative prompt", label="Negative Prompt", saved=False, help="Previews only."
    )
    original_image: str = _image("", IMAGE, ("D", "A"), key="original image", label="Original Image")
    target_image: str = _image("", IMAGE, ("D", "A"), key="target image", label="Target Image")
    second_pass: TrainConfig | None = None
    unknown_keys: tuple[str, ...] = field(default=(), init=False, compare=False, repr=False)
    _seed: int | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Spell choices as listed, sort the image size, and make the 2nd pass take every setting it hides from pass 1."""
        for spec in _CHOICE_FIELDS:
            value = getattr(self, spec.name)
            if isinstance(value, str):
                setattr(self, spec.name, canonical_choice(value, spec.choices))
        if isinstance(self.vae, str) and self.vae.strip().lower() == "none":
            self.vae = ""
        if not FIELD_BY_NAME["image_size"].type_problem(self.image_size):
            self.image_size = (min(self.image_size), max(self.image_size))
        if self.mode != "Difference":
            self.second_pass = None
        elif self.second_pass is not None:
            shared = {spec.name: getattr(self, spec.name) for spec in FIELDS if SECOND_PASS_CODE not in spec.shown_in}
            self.second_pass = dataclasses.replace(
                self.second_pass, **shared, second_pass=None, use_2nd_pass_settings=False
            )

    @property
    def effective_name(self) -> str:
        """The LoRA file stem: the sanitized save name, "untitled" when empty."""
        return sanitize_name(self.save_lora_name) if isinstance(self.save_lora_name, str) else "untitled"

    def resolved_seed(self) -> int:
        """The seed to train with: `train_seed`, or for -1 a random one drawn once and kept on this config."""
        if self.train_seed >= 0:
            return self.train_seed
        if self._seed is None:
            self._seed = secrets.randbelow(2**32)
        return self._seed

    def problems(self, unreadable: frozenset[str] = frozenset()) -> list[str]:
        """Every problem of these settings (2nd pass included), one sentence each; empty when all is well.

        `unreadable`: fields whose value could not be read (they hold defaults): the checks reading them are skipped."""
        typed = {spec.name: spec.type_problem(getattr(self, spec.name)) for spec in FIELDS}
        found = [problem for problem in typed.values() if problem]
        bad = {name for name, problem in typed.items() if problem} | unreadable
        found += [problem for names, check in _RULES if bad.isdisjoint(names) and (problem := check(self))]
        if self.second_pass is not None:
            found += [f"2nd pass: {p}" for p in self.second_pass.problems(unreadable) if p not in found]
        return found

    def validate(self) -> None:
        """Check every setting without touching any model; raise one TrainTrainError listing all problems."""
        found = self.problems()
        if found:
            raise TrainTrainError("Please fix these settings:\n" + "\n".join(f"- {p}" for p in found))

    def to_json_dict(self) -> dict[str, Any]:
        """The original's flat settings format: raw UI values, plus "2nd pass" in Difference mode."""
        data = self._raw_values(per_pass=True)
        if self.mode == "Difference":
            second = (self.second_pass or self)._raw_values(per_pass=True)
            data["2nd pass"] = {**second, "use_2nd_pass_settings": False}
        return {**data, **self._raw_values(per_pass=False)}

    def _raw_values(self, per_pass: bool) -> dict[str, Any]:
        return {s.key: s.raw(getattr(self, s.name)) for s in FIELDS if s.saved and s.per_pass == per_pass}

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Settings from the original's format or typed values; missing keys get defaults, unknown keys a warning.

        Wrong types raise one TrainTrainError; the unknown keys are kept in `unknown_keys`.
        """
        if not isinstance(data, Mapping):
            raise TrainTrainError("A settings file must hold one JSON object of key: value pairs.")
        problems: list[str] = []
        unknown: list[str] = []
        values = _read_values(data, FIELDS, {"2nd pass", "te"}, "", problems, unknown)
        second = None
        if canonical_choice(values.get("mode", "LoRA"), MODES) == "Difference":
            inner = {} if data.get("2nd pass") is None else data["2nd pass"]
            if not isinstance(inner, Mapping):
                problems.append("'2nd pass' must be a JSON object of settings.")
                inner = {}
            inner_values = _read_values(inner, PASS_FIELDS, set(), "2nd pass: ", problems, unknown)
            inner_flag = inner_values.pop("use_2nd_pass_settings", False)
            values["use_2nd_pass_settings"] = values.get("use_2nd_pass_settings", False) or inner_flag
            second = cls(**{**values, **inner_values})
        if problems:
            raise TrainTrainError("These settings have values of the wrong type:\n" + "\n".join(problems))
        config = cls(**values, second_pass=second)
        config.unknown_keys = tuple(unknown)
        if unknown:
            log.warning("Ignored unknown settings keys: %s", ", ".join(unknown))
        return config

    @classmethod
    def load_json(cls, path: Path) -> TrainConfig:
        """Read a settings JSON (a preset, a saved run or a CLI config)."""
        return cls.from_json_dict(read_json(Path(path), "settings file"))

    def save_json(self, path: Path) -> Path:
        """Write the settings JSON atomically."""
        return atomic_write_text(Path(path), json.dumps(self.to_json_dict(), indent=4, ensure_ascii=False) + "\n")


def _build_fields() -> tuple[FieldSpec, ...]:
    specs = []
    for item in dataclasses.fields(TrainConfig):
        if "spec" not in item.metadata:
            continue
        spec = dict(item.metadata["spec"])
        key = spec.pop("key", item.name)
        default = item.default_factory() if item.default is dataclasses.MISSING else item.default
        label = spec.pop("label", key.replace("_", " "))
        specs.append(FieldSpec(name=item.name, key=key, label=label, annotation=item.type, default=default, **spec))
    return tuple(specs)


FIELDS = _build_fields()
FIELD_BY_NAME = {spec.name: spec for spec in FIELDS}
PASS_FIELDS = tuple(spec for spec in FIELDS if spec.per_pass)
_CHOICE_FIELDS = tuple(spec for spec in FIELDS if spec.type is str and spec.choices)


def _read_values(
    data: Mapping[str, Any], specs: tuple[FieldSpec, ...], ignored: set[str], prefix: str, problems: list, unknown: list
) -> dict[str, Any]:
    """Parse the keys of `specs` found in `data`; collect type problems and keys nobody knows."""
    values = {}
    for spec in specs:
        if spec.key in data:
            try:
                values[spec.name] = spec.parse(data[spec.key])
            except TrainTrainError as error:
                problems.append(f"{prefix}{error}")
    known = {spec.key for spec in specs} | ignored
    unknown.extend(f"{prefix}{key}" for key in data if key not in known)
    return values


def _step_rules_problem(c: TrainConfig) -> str:
    if not c.train_lr_step_rules.strip():
        needed = c.train_lr_scheduler == "piecewise_constant"
        return "piecewise_constant needs 'train lr step rules', e.g. 1:3,0.5:6,0.1." if needed else ""
    try:
        parse_step_rules(c.train_lr_step_rules)
    except TrainTrainError as error:
        return str(error)
    return ""


def _name_problem(c: TrainConfig) -> str:
    name = c.save_lora_name.strip()
    if name and sanitize_name(name) == "untitled" and name.lower() != "untitled":
        return f"'save lora name' {name!r} has no usable characters: use letters, digits, - or _."
    return ""


Rule = tuple[tuple[str, ...], Callable[[TrainConfig], str]]  # (fields it reads, config -> problem or "")


def _rule(names: str, ok: Callable[[TrainConfig], bool], message: str) -> Rule:
    """A check of the space-separated fields `names`; `message` is formatted with c=the config."""
    return tuple(names.split()), lambda c: "" if ok(c) else message.format(c=c)


def _choice_rule(spec: FieldSpec) -> Rule:
    choices = ", ".join(spec.choices)
    return _rule(spec.name, lambda c: getattr(c, spec.name) in spec.choices,
                 f"'{spec.label}' must be one of {choices}, not {{c.{spec.name}!r}}.")  # fmt: skip


def _bound(name: str, low: float | None, high: float, *, above: bool = False, note: str = "") -> Rule:
    """`name` must be finite, at most `high` and at least `low` (above it when `above`); `low` None: no lower bound.

    Compares without converting to float, so a 400-digit integer is a message, not an OverflowError."""

    def problem(c: TrainConfig) -> str:
        value = getattr(c, name)
        label = FIELD_BY_NAME[name].label
        if not _finite(value):
            return f"'{label}' must be a finite number, not {value}."
        if low is not None and (value < low or (above and value == low)):
            return f"'{label}' must be {'above' if above else 'at least'} {low}{note}, not {_shown(value)}."
        if value > high:
            return f"'{label}' must be at most {high:g}, not {_shown(value)}."
        return ""

    return (name,), problem


def _finite(value: float) -> bool:
    """Not NaN or infinite (integers always are, however large)."""
    return not isinstance(value, float) or math.isfinite(value)


def _shown(value: float) -> str:
    """A number for a message: huge integers shortened to their magnitude."""
    text = str(value)
    return text if len(text) <= 20 else f"{text[:6]}… ({len(text)} digits)"


def _needs(modes: tuple[str, ...], name: str, ok: Callable[[Any], bool], message: str) -> Rule:
    return _rule(f"mode {name}", lambda c: c.mode not in modes or ok(getattr(c, name)), message)


_RULES: tuple[Rule, ...] = (
    *(_choice_rule(spec) for spec in _CHOICE_FIELDS),
    _bound("network_rank", 1, MAX_RANK),
    _bound("network_alpha", 0, MAX_RANK, above=True),
    _bound("network_conv_rank", 0, MAX_RANK, note=" (0 = network rank)"),
    _bound("network_conv_alpha", 0, MAX_RANK, note=" (0 = network alpha)"),
    _bound("network_strength", -MAX_STRENGTH, MAX_STRENGTH),
    _rule("network_type network_element", lambda c: c.network_type != "loha" or c.network_element == "Full",
          "'network element' {c.network_element} is not available with loha: choose Full, or lierla / c3lier."),
    _rule("network_blocks", lambda c: bool(c.network_blocks), "'network blocks' is empty: tick at least one."),
    _rule("network_blocks", lambda c: set(c.network_blocks) <= set(BLOCKS_SD),
          "'network blocks' may hold only BASE, IN00-IN11, M00 and OUT00-OUT11, not {c.network_blocks}."),
    _rule("image_size", lambda c: all(64 <= side <= MAX_IMAGE_SIDE and side % 8 == 0 for side in c.image_size),
          f"'image size(height, width)' sides must be multiples of 8 from 64 to {MAX_IMAGE_SIDE}, "
          "not {c.image_size}."),
    _bound("train_iterations", 1, MAX_STEPS),
    _bound("train_batch_size", 1, MAX_BATCH),
    _rule("train_learning_rate train_optimizer train_optimizer_settings",
          lambda c: own_learning_rate(c.train_optimizer, c.train_optimizer_settings)
          or (_finite(c.train_learning_rate) and 0 < c.train_learning_rate <= MAX_LEARNING_RATE),
          f"'train learning rate' must be above 0 and at most {MAX_LEARNING_RATE} "
          "(about 1.0 for Prodigy and D-Adaptation), not {c.train_learning_rate}."),
    _bound("train_textencoder_learning_rate", 0, MAX_LEARNING_RATE, note=" (0 = train learning rate)"),
    (("train_lr_step_rules", "train_lr_scheduler"), _step_rules_problem),
    _bound("train_lr_warmup_steps", 0, MAX_STEPS),
    _bound("train_lr_scheduler_num_cycles", 1, MAX_STEPS),
    _bound("train_lr_scheduler_power", 0, MAX_FACTOR, above=True),
    _rule("image_buckets_step", lambda c: 8 <= c.image_buckets_step <= MAX_IMAGE_SIDE and c.image_buckets_step % 8 == 0,
          "'image buckets step' must be a multiple of 8 such as 64 … 576, not {c.image_buckets_step}."),
    _rule("image_min_length", lambda c: 64 <= c.image_min_length <= MAX_IMAGE_SIDE and c.image_min_length % 8 == 0,
          f"'image min length' must be a multiple of 8 from 64 to {MAX_IMAGE_SIDE}, not {{c.image_min_length}}."),
    _bound("image_num_multiply", 1, MAX_REPEATS),
    _bound("image_max_ratio", 1, MAX_RATIO),
    _bound("sub_image_num", 0, MAX_SUB_IMAGES),
    _rule("train_seed", lambda c: -1 <= c.train_seed < 2**32,
          "'train seed' must be -1 (random) or below 4294967296, not {c.train_seed}."),
    _rule("train_min_timesteps train_max_timesteps",
          lambda c: 0 <= c.train_min_timesteps < c.train_max_timesteps <= 1000,
          "'train min timesteps' and 'train max timesteps' need 0 <= min < max <= 1000, "
          "not {c.train_min_timesteps} and {c.train_max_timesteps}."),
    _bound("train_snr_gamma", 0, MAX_FACTOR, note=" (0 = off)"),
    _bound("save_per_steps", 0, MAX_STEPS, note=" (0 = only at the end)"),
    _bound("diff_alt_ratio", -MAX_FACTOR, MAX_FACTOR),
    _bound("clip_skip", 1, 12, note=" (1 = the last layer)"),
    _rule("train_lora_precision train_model_precision",
          lambda c: c.train_lora_precision != "fp16" or c.train_model_precision not in ("fp16", "model"),
          "fp16 LoRA weights cannot train under fp16 model precision (the fp16 gradient scaler needs fp32 weights): "
          "set 'train lora precision' to fp32 or bf16, or 'train model precision' to bf16."),
    _rule("network_resume", lambda c: not c.network_resume.strip() or is_file(c.network_resume),
          "'network resume' {c.network_resume!r} is not a file: give the full path of a LoRA or leave it empty."),
    (("save_lora_name",), _name_problem),
    _needs(("LoRA", "Multi-ADDifT"), "lora_data_directory", is_dir,
           "'lora data directory' {c.lora_data_directory!r} is not a folder: {c.mode} trains on the images in it."),
    _needs(("Multi-ADDifT",), "diff_target_name", str.strip,
           "Multi-ADDifT needs a 'diff target name': the suffix of the target images, e.g. _closed_eyes."),
    _needs(("iLECO",), "original_prompt", str.strip, "iLECO needs an Original Prompt: the concept to change."),
    _needs(("Difference", "ADDifT"), "original_image", is_file,
           "{c.mode} needs an Original Image: {c.original_image!r} is not an image file."),
    _needs(("Difference", "ADDifT"), "target_image", is_file,
           "{c.mode} needs a Target Image: {c.target_image!r} is not an image file."),
)  # fmt: skip
