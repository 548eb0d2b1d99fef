"""Network modules on a toy model: hooks equal merged weights, selection rules, kohya / LyCORIS file format."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from traintrain.errors import TrainTrainError
from traintrain.models.bundle import LoraTarget
from traintrain.networks.kohya_io import (
    network_from_file,
    network_tensors,
    read_network_file,
    save_network,
)
from traintrain.networks.network import Network, NetworkSpec


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(4, 8, 1)
        self.to_q = nn.Linear(8, 8)
        self.to_k = nn.Linear(8, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.te_fc1 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        b, c, hh, ww = h.shape
        seq = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        seq = self.to_q(seq) + self.to_k(seq) + self.te_fc1(seq)
        h = seq.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return self.conv1(h)


def toy_targets(model: Toy) -> list[LoraTarget]:
    return [
        LoraTarget("lora_unet_proj_in", model.proj_in, "IN01", "transformer"),
        LoraTarget("lora_unet_attn1_to_q", model.to_q, "IN01", "attn1"),
        LoraTarget("lora_unet_attn2_to_k", model.to_k, "OUT03", "attn2"),
        LoraTarget("lora_unet_resnets_0_conv1", model.conv1, "OUT03", "resnet"),
        LoraTarget("lora_te_text_model_encoder_layers_0_mlp_fc1", model.te_fc1, "BASE", "te"),
    ]


def randomize(network: Network) -> None:
    torch.manual_seed(1)
    for p in network.parameters():
        p.data.normal_(0, 0.2)


def merged_copy(model: Toy, network: Network) -> Toy:
    """W + ΔW applied by hand from the network's delta weights."""
    merged = copy.deepcopy(model)
    layers = dict(zip([t.name for t in toy_targets(model)], [t.module for t in toy_targets(merged)]))
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            layers[name].weight += adapter.delta_weight()
    return merged


@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_hooked_output_equals_merged_weights(network_type: str) -> None:
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 4, 5, 5)
    base = model(x)
    network = Network.build(NetworkSpec(network_type, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0), toy_targets(model))
    randomize(network)
    with network.applied():
        hooked = model(x)
    assert torch.equal(model(x), base), "removing the hooks restores the base model exactly"
    assert not torch.allclose(hooked, base)
    torch.testing.assert_close(hooked, merged_copy(model, network)(x), rtol=1e-4, atol=1e-5)


def test_selection_rules() -> None:
    model = Toy()
    names = lambda spec: set(Network.build(spec, toy_targets(model)).adapters)  # noqa: E731
    lierla = names(NetworkSpec("lierla"))
    assert "lora_unet_resnets_0_conv1" not in lierla and "lora_unet_proj_in" in lierla
    assert "lora_unet_resnets_0_conv1" in names(NetworkSpec("c3lier"))
    assert names(NetworkSpec("lierla", element="CrossAttention")) == {"lora_unet_attn2_to_k"}
    assert names(NetworkSpec("lierla", element="SelfAttention")) == {"lora_unet_attn1_to_q"}
    assert names(NetworkSpec("lierla", blocks=["OUT03"])) == {"lora_unet_attn2_to_k"}
    assert names(NetworkSpec("lierla", blocks=["BASE"])) == {"lora_te_text_model_encoder_layers_0_mlp_fc1"}
    with pytest.raises(TrainTrainError, match="not available with loha"):
        Network.build(NetworkSpec("loha", element="CrossAttention"), toy_targets(model))
    with pytest.raises(TrainTrainError, match="No layer matches"):
        Network.build(NetworkSpec("lierla", blocks=["M00"]), toy_targets(model))


def test_conv_rank_and_alpha_for_3x3_convs() -> None:
    network = Network.build(NetworkSpec("c3lier", rank=4, alpha=2, conv_rank=2, conv_alpha=1), toy_targets(Toy()))
    conv = network.adapters["lora_unet_resnets_0_conv1"]
    assert conv.lora_down.weight.shape == (2, 8, 3, 3) and conv.lora_up.weight.shape == (8, 2, 1, 1)
    assert conv.scale == 0.5
    point = network.adapters["lora_unet_proj_in"]
    assert point.lora_down.weight.shape == (4, 4, 1, 1) and point.scale == 0.5


def test_param_groups_text_encoder_first_with_own_lr() -> None:
    network = Network.build(NetworkSpec("lierla"), toy_targets(Toy()))
    groups = network.param_groups(1e-4, 5e-5)
    assert [g["name"] for g in groups] == ["text_encoder", "unet"]
    assert groups[0]["lr"] == 5e-5 and groups[1]["lr"] == 1e-4
    assert network.param_groups(1e-4, None)[0]["lr"] == 1e-4


@pytest.mark.parametrize("network_type", ["lierla", "c3lier", "loha"])
def test_file_round_trip_and_keys(tmp_path, network_type: str) -> None:
    model = Toy()
    spec = NetworkSpec(network_type, rank=4, alpha=2.0)
    network = Network.build(spec, toy_targets(model))
    randomize(network)
    path = save_network(tmp_path / "x.safetensors", network, {"ss_network_dim": "4"}, torch.float32, 1.0)
    tensors, metadata = read_network_file(path)
    assert metadata["ss_network_dim"] == "4"
    suffixes = {k.split(".", 1)[1] for k in tensors}
    if network_type == "loha":
        assert suffixes == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    else:
        assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert {k.split(".")[0] for k in tensors} == set(network.adapters)
    fresh = network_from_file(path, toy_targets(model))
    assert set(fresh.adapters) == set(network.adapters)
    assert all(a.rank == 4 and float(a.alpha) == 2.0 for a in fresh.adapters.values())
    for (_, a), (_, b) in zip(sorted(network.adapters.items()), sorted(fresh.adapters.items())):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    assert not list(tmp_path.glob(".*tmp")), "no temp file left behind"


def test_strength_scales_delta_linearly() -> None:
    network = Network.build(NetworkSpec("lierla", rank=4, alpha=4), toy_targets(Toy()))
    randomize(network)
    one = network_tensors(network, torch.float32, 1.0)
    three = network_tensors(network, torch.float32, -3.0)
    key = "lora_unet_attn1_to_q"
    delta = lambda t: t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"]  # noqa: E731
    torch.testing.assert_close(delta(three), -3.0 * delta(one))


def test_pickled_and_missing_files_refused(tmp_path) -> None:
    with pytest.raises(TrainTrainError, match="only .safetensors and .pt"):
        read_network_file(tmp_path / "evil.ckpt")
    with pytest.raises(TrainTrainError, match="not found"):
        read_network_file(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainTrainError, match="not a readable"):
        read_network_file(tmp_path / "bad.safetensors")


def test_adapter_weight_dtype_follows_casts() -> None:
    from traintrain.networks.modules import LoRAModule

    adapter = LoRAModule(nn.Linear(8, 8), 4, 4)
    assert adapter.weight_dtype == torch.float32
    adapter.to(torch.float64)
    assert adapter.weight_dtype == torch.float64
