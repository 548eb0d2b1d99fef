"""The LDM adapter on WebUI-style models built with the `ldm` package: same numbers and names as the diffusers
adapter, names the WebUI's Lora loader maps back onto the trained modules (real SD1.5 / SD2.1 / SDXL layouts),
real trainings, and a model left bit-identical afterwards, error or not."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from ldm_tiny import (
    AutoencoderKL,
    Conditioner,
    CustomWords,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    LatentDiffusion,
    VAE_ARGS,
    OpenClipText,
    build_ldm_model,
    ldm_unet,
    make_sdxl,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from traintrain.demo import demo_config, write_sample_images
from traintrain.models.bundle import BASE_MODEL_VERSION
from traintrain.models.diffusers_backend import DiffusersBundle, ddpm_alphas_cumprod
from traintrain.models.ldm_bundle import LdmBundle
from traintrain.models.openclip_text import ProjectionView, SplitAttention
from traintrain.models.tokenizer import tiny_clip_tokenizer
from traintrain.modes import OutputDirs, RunContext, run_training
from traintrain.networks.kohya_io import module_names, network_from_file, read_network_file
from traintrain.networks.network import Network, NetworkSpec

PROMPTS = ["a red circle on a white background", "demo style, a blue square"]


def ldm_bundle(kind: str, **kwargs) -> tuple[LatentDiffusion, LdmBundle, object]:
    model, components = build_ldm_model(kind, **kwargs)
    return model, LdmBundle(model, tokenizer=tiny_clip_tokenizer()), components


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_sample_images(tmp_path_factory.mktemp("data") / "images")


# ----- the same model seen through both adapters


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_same_numbers_and_targets_as_the_diffusers_adapter(kind: str) -> None:
    model, bundle, components = ldm_bundle(kind)
    reference = DiffusersBundle(components)
    assert (bundle.kind, bundle.prediction) == (reference.kind, reference.prediction)
    assert torch.equal(bundle.alphas_cumprod, reference.alphas_cumprod)
    with torch.no_grad():
        cond, expected = bundle.encode_text(PROMPTS), reference.encode_text(PROMPTS)
        torch.testing.assert_close(cond.context, expected.context, atol=1e-5, rtol=1e-5)
        long_prompts = [*PROMPTS, ", ".join(["a red circle on white"] * 6)]  # 125 char tokens: two chunks
        bundle.clip_skip = reference.clip_skip = 2  # SD1 only
        long, long_expected = bundle.encode_text(long_prompts), reference.encode_text(long_prompts)
        assert long.context.shape[1] == 154
        torch.testing.assert_close(long.context, long_expected.context, atol=1e-5, rtol=1e-5)
        if kind == "sd1":
            assert not torch.allclose(long.context[:2, :77], cond.context, atol=1e-3), "clip skip takes another layer"
        if kind == "sdxl":
            torch.testing.assert_close(long.pooled, long_expected.pooled, atol=1e-5, rtol=1e-5)
        assert (cond.pooled is None) == (kind != "sdxl")
        if cond.pooled is not None:
            torch.testing.assert_close(cond.pooled, expected.pooled, atol=1e-5, rtol=1e-5)
        noisy, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
        plain = bundle.predict(noisy, timesteps, cond)
        torch.testing.assert_close(plain, reference.predict(noisy, timesteps, expected), atol=1e-5, rtol=1e-5)
        sizes = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [96.0, 80.0, 16.0, 8.0, 64.0, 64.0]])
        sized = bundle.predict(noisy, timesteps, cond, sizes)
        torch.testing.assert_close(sized, reference.predict(noisy, timesteps, expected, sizes), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sized[:1], plain[:1], atol=1e-6, rtol=1e-6)  # the default: uncropped, own size
        assert (kind == "sdxl") != torch.allclose(sized[1:], plain[1:], atol=1e-4), "only SDXL sees image sizes"
    ours = {t.name: t for t in bundle.lora_targets()}
    theirs = {t.name: t for t in reference.lora_targets()}
    assert ours.keys() == theirs.keys()
    for name, target in ours.items():
        assert (target.block, target.role) == (theirs[name].block, theirs[name].role), name
        assert torch.equal(target.module.weight, theirs[name].module.weight), name
    modules = set(model.modules())
    assert all(t.module in modules or t.module.attention in modules for t in ours.values())


def test_unwrapped_embedders_and_sampled_latents() -> None:
    _, wrapped, _ = ldm_bundle("sd1")
    _, plain, _ = ldm_bundle("sd1", wrapped=False)
    with torch.no_grad():
        assert torch.equal(wrapped.encode_text(PROMPTS).context, plain.encode_text(PROMPTS).context)
        pixels = torch.rand(2, 3, 64, 64) * 2 - 1
        latents = plain.encode_images(pixels)
        assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
        assert plain.decode_latents(latents).shape == (2, 3, 64, 64)


def test_schedule_prefers_the_full_precision_copy() -> None:
    model, _ = build_ldm_model("sd1")
    model.alphas_cumprod_original = ddpm_alphas_cumprod().double()
    model.alphas_cumprod = model.alphas_cumprod.half()
    bundle = LdmBundle(model)
    assert bundle.alphas_cumprod.dtype == torch.float32
    assert torch.equal(bundle.alphas_cumprod, ddpm_alphas_cumprod())


# ----- kohya names the WebUI's Lora loader maps back (real layouts, built on the meta device)


def webui_layer_mapping(model: LatentDiffusion) -> dict[str, nn.Module]:
    """The Lora extension's `network_layer_mapping`: wrapped embedders (SDXL: `<i>_` prefix) and `model`."""
    names: dict[str, nn.Module] = {}
    embedders = list(enumerate(model.conditioner.embedders)) if model.is_sdxl else [(None, model.cond_stage_model)]
    for index, embedder in embedders:
        prefix = "" if index is None else f"{index}_"
        if hasattr(embedder, "wrapped"):
            names.update({prefix + n.replace(".", "_"): m for n, m in embedder.wrapped.named_modules()})
    names.update({n.replace(".", "_"): m for n, m in model.model.named_modules()})
    return names


RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def webui_compvis_key(key: str, is_sd2: bool) -> str:
    """The Lora extension's diffusers → compvis key rules (webui.md §3.2), for SD's two layers per level."""
    if m := re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        side, block, kind, index, rest = m.group(1), int(m[2]), m[3], int(m[4]), m[5]
        suffix = RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        number = 1 + block * 3 + index if side == "down" else block * 3 + index
        part = "input" if side == "down" else "output"
        return f"diffusion_model_{part}_blocks_{number}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    openclip = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "self_attn": "attn"}
    if m := re.match(r"lora_te(2?)_text_model_encoder_layers_(\d+)_(.+)", key):
        if m[1] or is_sd2:
            rest = m[3]
            for hf, oc in openclip.items():
                rest = rest.replace(hf, oc)
            return f"{'1_' if m[1] else ''}model_transformer_resblocks_{m[2]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[2]}_{m[3]}"
    return key


def webui_module_for(key: str, mapping: dict[str, nn.Module]) -> nn.Module | None:
    """The module the WebUI's Lora loader attaches a kohya module key to (None: the key is dropped)."""
    converted = webui_compvis_key(key, is_sd2="model_transformer_resblocks" in mapping)
    module = mapping.get(converted)
    if module is None and (m := re.match(r"(.*)_([qkv]_proj)$", converted)):
        module = mapping.get(m[1])
    if module is None and key.startswith("lora_unet"):
        module = mapping.get(key.replace("lora_unet", "diffusion_model"))
    if module is None and key.startswith("lora_te1_text_model"):
        module = mapping.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def real_layout(name: str) -> LatentDiffusion:
    """SD1.5, SD2.1 or SDXL base as the WebUI holds it, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        clip_l = CustomWords(FrozenCLIPEmbedder(CLIPTextModel(CLIPTextConfig()), tiny_clip_tokenizer()))
        common = dict(image_size=32, model_channels=320, num_res_blocks=2)
        if name == "sd15":
            unet = ldm_unet(
                "sd1", **common, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], context_dim=768
            )
            kind, text = "sd1", clip_l
        elif name == "sd21":
            unet = ldm_unet(
                "sd2",
                **common,
                channel_mult=[1, 2, 4, 4],
                attention_resolutions=[4, 2, 1],
                num_head_channels=64,
                context_dim=1024,
            )
            kind, text = "sd2", CustomWords(FrozenOpenCLIPEmbedder(OpenClipText(49408, 1024, 24, 16, 4096, 1024)))
        else:
            unet = ldm_unet(
                "sdxl",
                **common,
                channel_mult=[1, 2, 4],
                attention_resolutions=[4, 2],
                num_head_channels=64,
                transformer_depth=10,
                context_dim=[2048] * 10,
            )
            for block in [*unet.input_blocks[4:6], *unet.output_blocks[3:6]]:  # SDXL: depth 2 at the middle level
                del block[1].transformer_blocks[2:]
            make_sdxl(unet, 2816)
            big_g = CustomWords(FrozenOpenCLIPEmbedder(OpenClipText(49408, 1280, 32, 20, 5120, 1280)))
            kind, text = "sdxl", Conditioner([clip_l, big_g])
        return LatentDiffusion(kind, unet, AutoencoderKL(**VAE_ARGS), text, torch.zeros(1000), "eps")


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_kohya_names_map_back_to_the_trained_webui_modules(name: str) -> None:
    model = real_layout(name)
    targets = LdmBundle(model, tokenizer=tiny_clip_tokenizer()).lora_targets()
    mapping = webui_layer_mapping(model)
    unmatched = []
    for target in targets:
        expected = target.module.attention if isinstance(target.module, ProjectionView) else target.module
        if webui_module_for(target.name, mapping) is not expected:
            unmatched.append(target.name)
    assert unmatched == []
    unet_names = [t.name for t in targets if t.name.startswith("lora_unet")]
    if name == "sdxl":  # kohya's compvis-style names: no diffusers → compvis rule (SD1's layout) touches them
        assert all(webui_compvis_key(n, is_sd2=False) == n for n in unet_names)
        assert "lora_unet_output_blocks_2_2_conv" in unet_names  # the first upsampler, after the attention
    else:
        assert all(
            n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for n in unet_names
        )
    # UNet: 12 per transformer of depth 1 (+10 per deeper block) and 86 / 66 resnet convs and samplers; TE: 6 per layer.
    # SD2.1's 24th OpenCLIP block has none: SD2 conditions on the penultimate layer (kohya's encoder has 23 layers).
    counts = {"sd15": (16 * 12 + 86, 12 * 6), "sd21": (16 * 12 + 86, 23 * 6), "sdxl": (11 * 2 + 70 * 10 + 66, 44 * 6)}
    unet = sum(t.name.startswith("lora_unet") for t in targets)
    text = sum(t.name.startswith("lora_te") for t in targets)
    assert (unet, text) == counts[name]


# ----- training through the real LoRA mode


def train(model: LatentDiffusion, bundle: LdmBundle, images: Path, tmp: Path, iterations: int = 6, **changes):
    config = dataclasses.replace(demo_config(images, iterations=iterations), **changes)
    dirs = OutputDirs(lora=tmp / "Lora", logs=tmp / "logs", jsons=tmp / "jsons")
    return run_training(RunContext(config, bundle, dirs))


def snapshot(model: nn.Module) -> tuple:
    """Everything a training may touch: tensors, requires_grad, modes, modules with an instance forward."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    patched = [name for name, m in model.named_modules() if "forward" in vars(m)]
    return state, [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()], patched


def outputs(model: LatentDiffusion, bundle: LdmBundle) -> list[torch.Tensor]:
    """The model's own forward for fixed inputs: UNet, text encoder(s), VAE."""
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = bundle.encode_text(PROMPTS)
        extra = {"y": torch.randn(2, 96, generator=generator)} if bundle.kind == "sdxl" else {}
        unet = model.model.diffusion_model(noisy, torch.tensor([5, 900]), context=cond.context, **extra)
        return [unet, cond.context, model.first_stage_model.decode(noisy[:1])]


def assert_same_state(model: nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) and after[0][k].dtype == before[0][k].dtype for k in after[0])
    assert after[1:] == before[1:]


def assert_unchanged(model: LatentDiffusion, bundle: LdmBundle, before: tuple, before_outputs: list) -> None:
    assert_same_state(model, before)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, bundle), before_outputs))


@pytest.mark.parametrize("kind, openclip", [("sd1", ""), ("sd2", "lora_te_"), ("sdxl", "lora_te2_")])
def test_lora_training_on_the_ldm_model(kind: str, openclip: str, images: Path, tmp_path: Path) -> None:
    model, bundle, components = ldm_bundle(kind)
    before, before_outputs = snapshot(model), outputs(model, bundle)
    result = train(model, bundle, images, tmp_path)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(set(result.losses)) > 1
    assert_unchanged(model, bundle, before, before_outputs)
    tensors, metadata = read_network_file(result.path)
    assert metadata["ss_base_model_version"] == BASE_MODEL_VERSION[kind]
    saved = module_names(tensors)
    targets = {t.name: t for t in bundle.lora_targets()}
    assert saved <= targets.keys() and any(n.startswith("lora_te") for n in saved)
    modules = set(model.modules())
    assert all(targets[n].module in modules or targets[n].module.attention in modules for n in saved)
    layers = {re.sub(r"_(q|k|v|out)_proj$", "", n) for n in saved if "_self_attn_" in n}
    assert all({f"{layer}_{p}_proj" for p in "qkv"} | {f"{layer}_out_proj"} <= saved for layer in layers)
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj") if openclip else ():  # trained through the views
        assert tensors[f"{openclip}text_model_encoder_layers_0_self_attn_{projection}.lora_up.weight"].abs().sum() > 0
    network_from_file(result.path, DiffusersBundle(components).lora_targets())  # the same format as the diffusers one


def test_training_that_fails_leaves_the_model_unchanged(images: Path, tmp_path: Path) -> None:
    model, bundle, _ = ldm_bundle("sdxl")
    before, before_outputs = snapshot(model), outputs(model, bundle)

    def fail(progress) -> None:
        raise RuntimeError(f"broken at step {progress.step}")

    config = dataclasses.replace(demo_config(images, iterations=4), use_gradient_checkpointing=True)
    dirs = OutputDirs(lora=tmp_path / "Lora", logs=tmp_path / "logs", jsons=tmp_path / "jsons")
    with pytest.raises(RuntimeError, match="broken at step 1"):
        run_training(RunContext(config, bundle, dirs, progress=fail))
    assert_unchanged(model, bundle, before, before_outputs)


# ----- training-time changes: split attention, gradients, checkpointing, placement


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["float", "bool", "none"])
def test_split_attention_computes_what_multihead_attention_does(batch_first: bool, mask_kind: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # batch 3, sequence 5
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    mask = {"float": torch.zeros(5, 5).masked_fill(causal, float("-inf")), "bool": causal, "none": None}[mask_kind]
    expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    split = SplitAttention(mha)
    seen = []
    hooks = [view.register_forward_hook(lambda m, i, o: seen.append(m)) for view in split.views.values()]
    with split.installed():
        out, weights = mha(x, x, x, need_weights=False, attn_mask=mask)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert weights is None and seen == list(split.views.values()) and "forward" not in vars(mha)


def test_gradients_reach_every_adapter_with_and_without_checkpointing() -> None:
    model, bundle, _ = ldm_bundle("sd2")
    for module in model.model.diffusion_model.modules():  # as in a yaml with use_checkpoint: True
        for flag in ("checkpoint", "use_checkpoint"):
            if hasattr(module, flag):
                setattr(module, flag, True)
    grads = []
    with bundle.training():
        network = Network.build(NetworkSpec(rank=4, alpha=4), bundle.lora_targets())
        for adapter in network.adapters.values():
            nn.init.normal_(adapter.lora_up.weight, std=0.01)
        for checkpointing in (False, True):
            bundle.set_gradient_checkpointing(checkpointing)
            with network.applied():
                out = bundle.predict(torch.ones(2, 4, 8, 8), torch.tensor([10, 600]), bundle.encode_text(PROMPTS))
                out.square().mean().backward()
            grads.append({n: a.lora_down.weight.grad for n, a in network.adapters.items()})
            network.zero_grad()
    # SD2 conditions on OpenCLIP's penultimate layer: its last block (layers_2) has no target, every other one trains.
    assert any(n.startswith("lora_te_text_model_encoder_layers_1_") for n in grads[0])
    assert not any(n.startswith("lora_te_text_model_encoder_layers_2_") for n in grads[0])
    assert any("_self_attn_q_proj" in n for n in grads[0])
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)
    assert all(m.checkpoint for m in model.modules() if isinstance(getattr(m, "checkpoint", None), bool))


def test_lossy_placement_is_undone_exactly() -> None:
    model, _ = build_ldm_model("sd1")
    bundle = LdmBundle(model, dtype=torch.bfloat16)
    before, before_outputs = snapshot(model), outputs(model, bundle)
    with bundle.training():
        assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            assert bundle.encode_text(PROMPTS[:1]).context.dtype == torch.bfloat16
    assert_unchanged(model, bundle, before, before_outputs)
    with pytest.raises(RuntimeError, match="inside training"):
        bundle.set_gradient_checkpointing(True)


def test_half_precision_model_trains_in_fp32_and_comes_back_half() -> None:
    model, _ = build_ldm_model("sd1")
    model.half()  # the WebUI without --no-half
    model.model.diffusion_model.dtype = torch.float16  # the yaml's use_fp16: LDM casts the UNet input to it
    bundle = LdmBundle(model, dtype=torch.float32)
    before = snapshot(model)
    with bundle.training():
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.model.diffusion_model.dtype == torch.float32
        with torch.no_grad():
            out = bundle.predict(torch.ones(1, 4, 8, 8), torch.tensor([50]), bundle.encode_text(PROMPTS[:1]))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_same_state(model, before)
    assert model.model.diffusion_model.dtype == torch.float16
