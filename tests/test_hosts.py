"""Host detection by capability, and the reForge host: the A1111 in-place path over a model whose weights are
inference tensors (as reForge's generations leave them) after ldm_patched unloaded its LoRA patches."""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ldm_tiny import build_ldm_model
from test_webui_glue import FakeWebUI, config_for
from torch import nn

from traintrain import hosts
from traintrain.hosts.a1111 import A1111ModelProvider
from traintrain.hosts.forge import ForgeModelProvider
from traintrain.hosts.reforge import ReForgeModelProvider, replace_inference_tensors
from traintrain.modes import OutputDirs, RunContext, run_training


def install_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__path__ = []
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


@pytest.mark.parametrize(
    "forge_reload, ldm_patched, version, expected, provider",
    [
        (True, True, "neo", "Forge Neo", ForgeModelProvider),
        (True, True, "f2.0.1v1.10.1-previous-669-gdfdcbab6", "Forge", ForgeModelProvider),
        (True, False, None, "Forge", ForgeModelProvider),
        (False, True, None, "reForge", ReForgeModelProvider),
        (False, False, None, "AUTOMATIC1111", A1111ModelProvider),
    ],
)
def test_the_host_is_told_by_what_it_offers(monkeypatch, forge_reload, ldm_patched, version, expected, provider):
    install_module(monkeypatch, "modules")
    sd_models = install_module(monkeypatch, "modules.sd_models")
    if forge_reload:
        sd_models.forge_model_reload = lambda: (None, False)
    for name in ("ldm_patched", "modules_forge", "modules_forge.forge_version"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    if ldm_patched:
        install_module(monkeypatch, "ldm_patched")
    if version is not None:
        install_module(monkeypatch, "modules_forge")
        install_module(monkeypatch, "modules_forge.forge_version", version=version)
    host = hosts.detect_host()
    assert host.name == expected and type(host.provider()) is provider


HOST_PACKAGES = {"modules", "backend", "modules_forge", "ldm_patched", "launch", "networks"}
PACKAGE = Path(__file__).resolve().parents[1] / "traintrain"


def host_imports(tree: ast.AST) -> list[ast.stmt]:
    """The import statements of host packages in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0] in HOST_PACKAGES for name in names):
            found.append(node)
    return found


def test_host_code_is_imported_only_by_the_hosts_package_and_only_inside_functions() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.parent.name != "hosts":
            assert host_imports(tree) == [], f"{path} imports host code"
        else:
            assert [node for node in tree.body if node in host_imports(tree)] == [], f"{path}: module-level import"
    assert host_imports(ast.parse((PACKAGE / "hosts" / "forge.py").read_text())), "the scan finds lazy imports"


def as_inference_tensors(model: nn.Module) -> None:
    """What reForge's generations leave: every weight moved / patched under inference mode."""
    with torch.inference_mode():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None:
                        copy = tensor.clone()
                        store[name] = nn.Parameter(copy, requires_grad=False) if name in module._parameters else copy


class FakeLdmPatched:
    """`ldm_patched.modules.model_management`: unloading unpatches the merged LoRA weight (in inference mode)."""

    def __init__(self, monkeypatch, layer: nn.Module, calls: list) -> None:
        self.layer, self.calls, self.backup = layer, calls, None
        install_module(monkeypatch, "ldm_patched")
        install_module(monkeypatch, "ldm_patched.modules")
        install_module(
            monkeypatch,
            "ldm_patched.modules.model_management",
            unload_all_models=self.unload_all_models,
            soft_empty_cache=lambda force=False: calls.append(("soft_empty_cache",)),
        )

    @torch.inference_mode()
    def merge(self, delta: float) -> None:
        self.backup = self.layer.weight.clone()
        self.layer.weight.add_(delta)

    @torch.inference_mode()
    def unload_all_models(self) -> None:
        self.calls.append(("unload_all_models",))
        if self.backup is not None:
            self.layer.weight.copy_(self.backup)
            self.backup = None


@pytest.fixture
def reforge(monkeypatch, tmp_path):
    model = build_ldm_model("sd1")[0]
    as_inference_tensors(model)
    fake = FakeWebUI(monkeypatch, model, tmp_path / "models")
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    return SimpleNamespace(model=model, fake=fake, ldm=FakeLdmPatched(monkeypatch, layer, fake.calls))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from traintrain.demo import write_sample_images

    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


def test_reforge_trains_in_place_over_inference_tensors_and_leaves_them_bit_identical(reforge, images, tmp_path):
    clean = {key: value.clone() for key, value in reforge.model.state_dict().items()}
    reforge.ldm.merge(0.5)  # a generation with <lora:…> patched it in place
    dirs = OutputDirs(lora=tmp_path / "Lora", logs=tmp_path / "logs", jsons=tmp_path / "jsons")
    held = []
    config = config_for(images)
    with ReForgeModelProvider().open(config) as bundle:
        assert bundle.sd_model is reforge.model
        result = run_training(
            RunContext(config, bundle, dirs, progress=lambda _: held.append(reforge.fake.locked_elsewhere()))
        )
    assert result.steps == 3 and held == [True] * 3 and result.path.is_file()
    assert reforge.fake.calls[:2] == [("unload_all_models",), ("soft_empty_cache",)]
    assert reforge.fake.calls[-1] == ("list_available_networks",)
    after = reforge.model.state_dict()
    assert after.keys() == clean.keys() and all(torch.equal(after[key], clean[key]) for key in clean)
    assert not any(value.is_inference() for value in after.values())


def test_without_the_replacement_inference_tensors_break_the_training(reforge, images, tmp_path):
    """What the reForge host exists for: the A1111 path alone cannot train these weights."""
    dirs = OutputDirs(lora=tmp_path / "Lora", logs=tmp_path / "logs", jsons=tmp_path / "jsons")
    config = dataclasses.replace(config_for(images), train_iterations=1)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        with A1111ModelProvider().open(config) as bundle:
            run_training(RunContext(config, bundle, dirs))


def test_replacing_inference_tensors_keeps_values_kinds_and_counts():
    with torch.inference_mode():
        layer = nn.Linear(3, 2)
        layer.register_buffer("scale", torch.arange(3.0))
    layer.register_buffer("plain", torch.ones(1))
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    assert replace_inference_tensors(layer) == 3
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert not isinstance(layer.scale, nn.Parameter)
    assert all(torch.equal(layer.state_dict()[key], value) for key, value in before.items())
    assert replace_inference_tensors(layer) == 0
