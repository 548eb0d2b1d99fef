"""`bench --adapter ldm`: SD1.5 in the WebUI's model layout, and the WebUI-like UNet patches it runs under."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from ldm.modules import attention as ldm_attention  # noqa: E402
from ldm.modules.diffusionmodules import openaimodel as ldm_openaimodel  # noqa: E402

from traintrain.bench import run_bench  # noqa: E402
from traintrain.bench.settings import BenchSettings  # noqa: E402
from traintrain.bench.webui_layout import timestep_embedding_on_device, webui_unet_patches  # noqa: E402
from traintrain.errors import TrainTrainError  # noqa: E402


@pytest.mark.parametrize("dim", [320, 7])
def test_timestep_embedding_matches_ldms(dim: int) -> None:
    timesteps = torch.tensor([0, 1, 250, 999])
    torch.testing.assert_close(
        timestep_embedding_on_device(timesteps, dim), ldm_openaimodel.timestep_embedding(timesteps, dim)
    )


def test_sdpa_attention_matches_ldms_and_the_patches_are_undone() -> None:
    torch.manual_seed(0)
    attention = ldm_attention.CrossAttention(query_dim=32, context_dim=24, heads=4, dim_head=8).eval()
    x, context = torch.randn(2, 16, 32), torch.randn(2, 7, 24)
    original_forward, original_embedding = ldm_attention.CrossAttention.forward, ldm_openaimodel.timestep_embedding
    with torch.no_grad():
        expected = attention(x, context)
        with webui_unet_patches():
            assert ldm_openaimodel.timestep_embedding is timestep_embedding_on_device
            got = attention(x, context)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ldm_attention.CrossAttention.forward is original_forward
    assert ldm_openaimodel.timestep_embedding is original_embedding


def test_ldm_adapter_is_for_sd15_only() -> None:
    with pytest.raises(TrainTrainError, match="--model sd1"):
        BenchSettings(model="sdxl", adapter="ldm").check()


def test_full_size_sd15_in_the_webui_layout_trains_through_the_webui_adapter() -> None:
    """Random-weight SD1.5 (ldm's UNetModel, 860M parameters) behind LdmBundle, at 64 px: one timed step each."""
    lines: list[str] = []
    run_bench(BenchSettings(model="sd1", adapter="ldm", resolution=64, steps=1, warmup=1), out=lines.append)
    printout = "\n".join(lines)
    assert "model sd1 (random weights, WebUI LDM layout)" in printout
    assert re.search(r"^mode \(LoRA via run_training, eager\): [0-9.]+ steps/s", printout, re.M)
    assert re.search(r"^ratio: [0-9.]+ \(mode / reference\)$", printout, re.M)
