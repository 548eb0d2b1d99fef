"""The AUTOMATIC1111 host against small fake `modules.*` (and Lora extension) objects around a tiny ldm-built model:
the generation lock held for the whole training, merged Lora weights restored, lowvram suspended and put back, fp8
and non-LDM models refused, checkpoint / VAE picks loaded and undone, the Lora list refreshed, and the entry script's
wiring."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from host_fakes import FakeState
from ldm_tiny import build_ldm_model
from PIL import Image
from torch import nn

from traintrain.config import TrainConfig
from traintrain.demo import demo_config, write_sample_images
from traintrain.errors import TrainTrainError
from traintrain import hosts
from traintrain.hosts import common
from traintrain.hosts.a1111 import A1111ModelProvider
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.previews import preview_requests
from traintrain.progress import StopFlag

ROOT = Path(__file__).resolve().parents[1]
OPTS = SimpleNamespace(
    outdir_samples="", outdir_txt2img_samples="outputs/txt2img", outdir_grids="", outdir_txt2img_grids="outputs/grids"
)


class FakeWebUI:
    """`modules.*` as the glue uses them, recording what it is asked to do."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sd_model: nn.Module, models_path: Path) -> None:
        self.calls: list[tuple] = []
        self.queue_lock = threading.Lock()
        self.checkpoints = {"base.safetensors [aaaa]": SimpleNamespace(filename="/m/base.safetensors")}
        sd_model.sd_checkpoint_info = self.checkpoints["base.safetensors [aaaa]"]
        self.models = {"/m/base.safetensors": sd_model}
        parts = {
            "call_queue": dict(queue_lock=self.queue_lock),
            "devices": dict(device=torch.device("cpu")),
            "shared": dict(sd_model=sd_model, opts=OPTS, cmd_opts=SimpleNamespace(), state=FakeState()),
            "paths_internal": dict(models_path=str(models_path)),
            "sd_models": dict(
                get_closet_checkpoint_match=self.checkpoints.get,
                reload_model_weights=self.reload_model_weights,
                list_models=lambda: self.calls.append(("list_models",)),
                checkpoint_tiles=lambda: list(self.checkpoints),
            ),
            "sd_vae": dict(
                vae_dict={"anime.vae.pt": "/m/VAE/anime.vae.pt"},
                loaded_vae_file=None,
                reload_vae_weights=self.reload_vae_weights,
                refresh_vae_list=lambda: self.calls.append(("refresh_vae_list",)),
            ),
            "lowvram": dict(module_in_gpu=None, send_everything_to_cpu=lambda: self.calls.append(("to_cpu",))),
            "processing": dict(StableDiffusionProcessingTxt2Img=self.txt2img, process_images=self.process_images),
        }
        package = types.ModuleType("modules")
        package.__path__ = []
        monkeypatch.setitem(sys.modules, "modules", package)
        for name, attributes in parts.items():
            module = types.ModuleType(f"modules.{name}")
            module.__dict__.update(attributes)
            setattr(package, name, module)
            monkeypatch.setitem(sys.modules, f"modules.{name}", module)
        self.modules = package
        self.networks = fake_lora_extension(self.calls)
        monkeypatch.setitem(sys.modules, "networks", self.networks)

    def txt2img(self, **settings) -> SimpleNamespace:
        """`processing.StableDiffusionProcessingTxt2Img`: the settings, and `close` as `contextlib.closing` wants."""
        return SimpleNamespace(**settings, close=lambda: self.calls.append(("close",)))

    def process_images(self, p) -> SimpleNamespace:
        """`processing.process_images`: records what it was asked for and whether it held the generation lock."""
        locked = self.locked_elsewhere()
        self.calls.append(("process_images", p.prompt, p.seed, p.width, p.height, locked, self.state.job))
        return SimpleNamespace(images=[Image.new("RGB", (p.width, p.height))])

    @property
    def state(self) -> FakeState:
        return self.modules.shared.state

    def reload_model_weights(self, info) -> None:
        self.calls.append(("reload_model_weights", info.filename))
        self.modules.shared.sd_model = self.models[info.filename]

    def reload_vae_weights(self, sd_model, vae_file) -> None:
        self.calls.append(("reload_vae_weights", vae_file))
        self.modules.sd_vae.loaded_vae_file = vae_file

    def locked_elsewhere(self) -> bool:
        """Whether another thread (a generation) would have to wait for the lock now."""
        result = []
        thread = threading.Thread(target=lambda: result.append(self.queue_lock.acquire(timeout=0.01)))
        thread.start()
        thread.join()
        if result[0]:
            self.queue_lock.release()
        return not result[0]


def fake_lora_extension(calls: list) -> types.ModuleType:
    """The Lora extension's `networks` module: the merge backups and their restore as in A1111 1.10."""
    networks = types.ModuleType("networks")
    networks.loaded_networks = []

    def network_restore_weights_from_backup(module: nn.Module) -> None:
        module.weight.copy_(module.network_weights_backup)  # in place, like the WebUI: needs torch.no_grad()
        if module.network_bias_backup is not None:
            module.bias.copy_(module.network_bias_backup)

    def network_reset_cached_weight(module: nn.Module) -> None:
        module.network_current_names, module.network_weights_backup, module.network_bias_backup = (), None, None

    networks.network_restore_weights_from_backup = network_restore_weights_from_backup
    networks.network_reset_cached_weight = network_reset_cached_weight
    networks.list_available_networks = lambda: calls.append(("list_available_networks",))
    return networks


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture
def model() -> nn.Module:
    return build_ldm_model("sd1")[0]


@pytest.fixture
def fake(monkeypatch, model, tmp_path) -> FakeWebUI:
    return FakeWebUI(monkeypatch, model, tmp_path / "models")


def config_for(images: Path, **changes):
    return dataclasses.replace(demo_config(images, iterations=3), train_model_precision="model", **changes)


def train_through_provider(fake: FakeWebUI, config, tmp: Path, progress=None):
    dirs = OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")
    with A1111ModelProvider().open(config) as bundle:
        return bundle, run_training(RunContext(config, bundle, dirs, progress=progress))


def test_training_holds_the_generation_lock_and_refreshes_the_lora_list(fake, model, images, tmp_path) -> None:
    before = {key: value.clone() for key, value in model.state_dict().items()}
    held = []
    bundle, result = train_through_provider(
        fake, config_for(images), tmp_path, lambda _: held.append(fake.locked_elsewhere())
    )
    assert result.steps == 3 and held == [True, True, True]
    assert not fake.locked_elsewhere()
    assert fake.calls.count(("list_available_networks",)) == 1
    assert bundle.sd_model is model and (bundle.device, bundle.dtype) == (torch.device("cpu"), torch.float32)
    assert result.path.is_file()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_merged_lora_weights_are_restored_first(fake, model, images) -> None:
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    clean = layer.weight.detach().clone()
    layer.network_weights_backup, layer.network_bias_backup = clean.clone(), None
    layer.network_current_names = (("style", 1.0, 1.0, None),)
    with torch.no_grad():
        layer.weight += 0.5  # what the Lora extension's in-place merge left behind
    fake.networks.loaded_networks.append(SimpleNamespace(name="style"))
    with A1111ModelProvider().open(config_for(images)):
        assert torch.equal(layer.weight, clean)
        assert fake.networks.loaded_networks == [] and layer.network_current_names == ()
        assert layer.network_weights_backup is None and layer.weight.requires_grad


def test_lowvram_offloading_is_suspended_and_put_back(fake, model, images, tmp_path) -> None:
    moved = []

    def send_me_to_gpu(module, _):
        moved.append(module)

    unet, vae = model.model.diffusion_model, model.first_stage_model
    hooked = [*unet.input_blocks, unet.middle_block, *unet.output_blocks, model.cond_stage_model.wrapped.transformer]
    for block in hooked:
        block.register_forward_pre_hook(send_me_to_gpu)
    hooks_before = [list(block._forward_pre_hooks.values()) for block in hooked]
    encode, decode = vae.encode, vae.decode
    vae.encode = lambda x: (send_me_to_gpu(vae, None), encode(x))[1]
    vae.decode = lambda z: (send_me_to_gpu(vae, None), decode(z))[1]
    wrappers = (vae.encode, vae.decode)
    model.lowvram, fake.modules.lowvram.module_in_gpu = True, unet.middle_block
    _, result = train_through_provider(fake, config_for(images), tmp_path)
    assert result.steps == 3 and moved == [], "no offloading may happen while training"
    assert ("to_cpu",) in fake.calls and fake.modules.lowvram.module_in_gpu is None
    assert [list(block._forward_pre_hooks.values()) for block in hooked] == hooks_before
    assert (vae.encode, vae.decode) == wrappers
    vae.encode(torch.zeros(1, 3, 64, 64))
    assert moved == [vae]


def test_fp8_weights_are_refused_and_the_lock_released(fake, model, images) -> None:
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(TrainTrainError, match="FP8 weight to Disable"):
        with A1111ModelProvider().open(config_for(images)):
            pass
    assert not fake.locked_elsewhere() and ("list_available_networks",) in fake.calls


def test_model_objects_that_are_not_ldm_modules_are_refused(fake, images) -> None:
    fake.modules.shared.sd_model = SimpleNamespace(forge_objects=None)
    with pytest.raises(TrainTrainError, match="loaded model is a SimpleNamespace"):
        with A1111ModelProvider().open(config_for(images)):
            pass
    assert not fake.locked_elsewhere() and fake.state.job == ""


def test_picked_checkpoint_and_vae_are_loaded_and_undone(fake, model, images) -> None:
    other = build_ldm_model("sd2")[0]
    fake.checkpoints["v2.safetensors [bbbb]"] = SimpleNamespace(filename="/m/v2.safetensors")
    fake.models["/m/v2.safetensors"] = other
    config = config_for(images, model="v2.safetensors [bbbb]", vae="anime.vae.pt", model_v_pred=False)
    with A1111ModelProvider().open(config) as bundle:
        assert bundle.sd_model is other and bundle.kind == "sd2" and bundle.prediction == "v"
    assert fake.calls[:2] == [
        ("reload_model_weights", "/m/v2.safetensors"),
        ("reload_vae_weights", "/m/VAE/anime.vae.pt"),
    ]
    assert fake.calls[2:4] == [("reload_vae_weights", None), ("reload_model_weights", "/m/base.safetensors")]
    assert fake.modules.shared.sd_model is model
    with A1111ModelProvider().open(config_for(images, vae="None", model_v_pred=True)) as bundle:
        assert bundle.sd_model is model and bundle.prediction == "v"
    assert fake.calls[4:] == [("list_available_networks",)] * 2  # 'None' = as loaded: nothing reloaded


@pytest.mark.parametrize("field, value", [("model", "missing.ckpt"), ("vae", "missing.vae.pt")])
def test_unknown_picks_are_refused(fake, images, field: str, value: str) -> None:
    with pytest.raises(TrainTrainError, match=f"'{value}' is not in the WebUI's"):
        with A1111ModelProvider().open(config_for(images, **{field: value})):
            pass
    assert not fake.locked_elsewhere()


def test_folders_and_lists(fake, tmp_path) -> None:
    assert common.lora_dir() == tmp_path / "models" / "Lora"
    fake.modules.shared.cmd_opts.lora_dir = "/data/Lora"
    assert common.lora_dir() == Path("/data/Lora")
    setattr(fake.modules.shared.opts, hosts.LORA_DIR_OPTION, "/data/Lora/trained")
    assert common.lora_dir() == Path("/data/Lora/trained")
    assert common.checkpoint_choices() == ["", "base.safetensors [aaaa]"]
    assert common.vae_choices() == ["", "anime.vae.pt"]
    assert ("list_models",) in fake.calls and ("refresh_vae_list",) in fake.calls


def test_entry_script_registers_the_tab_and_setting(fake, monkeypatch) -> None:
    registered: dict[str, list] = {"tabs": [], "settings": []}
    fake.modules.script_callbacks = SimpleNamespace(
        on_ui_tabs=registered["tabs"].append, on_ui_settings=registered["settings"].append
    )
    fake.modules.scripts = SimpleNamespace(basedir=lambda: str(ROOT))
    options = {}
    fake.modules.shared.OptionInfo = lambda default, label, section: SimpleNamespace(
        default=default, label=label, section=section, needs_reload_ui=lambda: "reload"
    )
    fake.modules.shared.opts.add_option = options.__setitem__
    built = {}
    app = types.ModuleType("traintrain.ui.app")
    app.build_ui = lambda *args, **kwargs: built.update(args=args, kwargs=kwargs) or "blocks"
    monkeypatch.setitem(sys.modules, "traintrain.ui.app", app)
    spec = importlib.util.spec_from_file_location("traintrain", ROOT / "scripts" / "traintrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert len(registered["tabs"]) == len(registered["settings"]) == 1
    registered["settings"][0]()
    assert options == {hosts.LORA_DIR_OPTION: "reload"}
    assert registered["tabs"][0]() == [("blocks", "TrainTrain", "traintrain")]
    provider, dirs, presets, queue_file = built["args"]
    assert type(provider) is A1111ModelProvider and dirs.lora == common.lora_dir()
    assert (presets, queue_file, dirs.logs) == (ROOT / "presets", ROOT / "queue.json", ROOT / "logs")
    assert built["kwargs"] == {"model_choices": hosts.Host.model_choices, "vae_choices": hosts.Host.vae_choices}


def test_the_webui_interrupt_button_stops_the_training(fake, images, tmp_path) -> None:
    stop = StopFlag()
    state = fake.modules.shared.state
    provider = A1111ModelProvider(on_interrupt=lambda: stop.request(save=True))
    dirs = OutputDirs(lora=tmp_path / "Lora", logs=tmp_path / "logs", jsons=tmp_path / "jsons")
    config = config_for(images, train_iterations=5000)

    def press_interrupt(progress) -> None:
        assert state.job == "TrainTrain"
        if progress.step == 2:
            state.interrupted = True

    with provider.open(config) as bundle:
        result = run_training(RunContext(config, bundle, dirs, progress=press_interrupt, stop=stop))
    assert result.stopped and result.steps < 5000 and result.path.name.startswith("demo_")
    assert state.job == ""


def test_ileco_previews_go_through_the_webuis_txt2img_under_its_lock(fake) -> None:
    config = TrainConfig(mode="iLECO", original_prompt="a cat", target_prompt="a dog", image_size=(64, 96))
    images = A1111ModelProvider().preview(config, preview_requests(config, "all", seed=11))
    assert [image.size for image in images] == [(96, 64)] * 2
    drawn = [call for call in fake.calls if call[0] == "process_images"]
    assert drawn == [("process_images", p, 11, 96, 64, True, "TrainTrain preview") for p in ("a cat", "a dog")]
    assert fake.calls.count(("close",)) == 2 and fake.state.job == "" and not fake.locked_elsewhere()


def test_previews_are_refused_while_the_webui_is_busy(fake) -> None:
    config = TrainConfig(mode="iLECO", original_prompt="a cat")
    with fake.queue_lock:
        with pytest.raises(TrainTrainError, match="busy"):
            A1111ModelProvider().preview(config, preview_requests(config, "original"))
    assert not any(call[0] == "process_images" for call in fake.calls)


def test_the_webuis_clip_skip_reaches_the_text_encoder(fake, images, monkeypatch) -> None:
    monkeypatch.setattr(OPTS, "CLIP_stop_at_last_layers", 2, raising=False)
    with A1111ModelProvider().open(config_for(images)) as bundle:
        assert bundle.clip_skip == 2
        skipped = bundle.encode_text(["a red circle"]).context
        bundle.clip_skip = 1
        last = bundle.encode_text(["a red circle"]).context
    assert not torch.allclose(skipped, last)
    monkeypatch.setattr(OPTS, "CLIP_stop_at_last_layers", "2", raising=False)  # a bad value is the default, 1
    assert common.clip_skip() == 1
