"""Tiny models, the diffusers ModelBundle and the offline CLIP tokenizers."""

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from torch import nn

from traintrain.errors import TrainTrainError
from traintrain.models import tokenizer as tokenizer_module
from traintrain.models.bundle import ModelBundle
from traintrain.models.diffusers_backend import ddpm_alphas_cumprod
from traintrain.models.tiny import build_tiny, build_tiny_components, save_tiny_pipeline
from traintrain.models.tokenizer import clip_bpe_tokenizer, tiny_clip_tokenizer

KINDS = ("sd1", "sd2", "sdxl")
WIDTH = {"sd1": 32, "sd2": 48, "sdxl": 80}
PROMPTS = ["a cat", "a red dog, (smile:1.2)"]


def weights(unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    modules = {"unet": unet, "vae": vae, **{f"te{i}": te for i, te in enumerate(text_encoders)}}
    return {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def hidden(bundle, index: int, prompts: list[str]):
    """Reference: the raw text-encoder output for `prompts`."""
    tok, te = bundle.components.tokenizers[index], bundle.components.text_encoders[index]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return te(ids, output_hidden_states=True)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_and_global_rng_untouched(kind):
    state = torch.random.get_rng_state()
    first, second, other = (build_tiny_components(kind, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert_same_weights(*(weights(c.unet, c.vae, c.text_encoders) for c in (first, second)))
    a, b = weights(first.unet, first.vae, first.text_encoders), weights(other.unet, other.vae, other.text_encoders)
    assert all(
        not torch.equal(a[key], b[key]) for key in a if key.endswith("conv_in.weight") or key.endswith("q_proj.weight")
    )
    assert (first.kind, first.prediction) == (kind, "v" if kind == "sd2" else "epsilon")


@pytest.mark.parametrize("kind", KINDS)
def test_bundle_shapes(kind):
    bundle = build_tiny(kind)
    assert isinstance(bundle, ModelBundle)
    cond = bundle.encode_text(PROMPTS)
    assert cond.context.shape == (2, 77, WIDTH[kind])
    assert (cond.pooled is None) == (kind != "sdxl")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = bundle.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32 and not latents.requires_grad
    out = bundle.predict(torch.randn_like(latents), torch.tensor([10, 900]), cond)
    assert out.shape == (2, 4, 8, 8)
    decoded = bundle.decode_latents(latents)
    assert decoded.shape == (2, 3, 64, 64) and decoded.abs().max() <= 1.0


def test_sdxl_pooled_and_concatenated_penultimate_states():
    bundle = build_tiny("sdxl")
    cond = bundle.encode_text(PROMPTS)
    te1, te2 = hidden(bundle, 0, PROMPTS), hidden(bundle, 1, PROMPTS)
    assert cond.pooled.shape == (2, 48)
    assert torch.allclose(cond.pooled, te2.text_embeds)
    assert torch.allclose(cond.context[..., :32], te1.hidden_states[-2])
    assert torch.allclose(cond.context[..., 32:], te2.hidden_states[-2])


def test_sd1_last_layer_and_sd2_last_layer_of_the_converted_encoder():
    sd1 = build_tiny("sd1")
    assert torch.allclose(sd1.encode_text(PROMPTS).context, hidden(sd1, 0, PROMPTS).last_hidden_state)
    sd2 = build_tiny("sd2")
    reference = hidden(sd2, 0, PROMPTS)
    # The diffusers SD2 encoder is OpenCLIP without its last block: its last layer (final norm applied) is
    # OpenCLIP's penultimate, what the WebUI and diffusers' SD2 pipeline condition on.
    assert torch.allclose(sd2.encode_text(PROMPTS).context, reference.last_hidden_state)


def test_clip_skip_takes_an_earlier_sd1_layer_with_the_final_norm():
    sd1 = build_tiny("sd1")
    reference = hidden(sd1, 0, PROMPTS)
    sd1.clip_skip = 2
    norm = sd1.components.text_encoders[0].text_model.final_layer_norm
    assert torch.allclose(sd1.encode_text(PROMPTS).context, norm(reference.hidden_states[-2]))
    sdxl = build_tiny("sdxl")
    plain = sdxl.encode_text(PROMPTS).context
    sdxl.clip_skip = 2
    assert torch.equal(sdxl.encode_text(PROMPTS).context, plain), "SDXL always takes the penultimate layers"


def chunk_reference(bundle, index: int, prompt: str, cut: int) -> torch.Tensor:
    """The encoder's conditioning layer for a prompt of more than 75 tokens, encoded by hand as the WebUI does: the
    first `cut` text tokens and the rest, each as its own 77-token sequence, concatenated."""
    tok, te = bundle.components.tokenizers[index], bundle.components.text_encoders[index]
    ids = tok(prompt, add_special_tokens=False).input_ids
    rows = []
    for part in (ids[:cut], ids[cut:]):
        rows.append([tok.bos_token_id, *part, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(part)))
    output = te(torch.tensor(rows), output_hidden_states=True)
    layer = output.hidden_states[-2] if bundle.kind == "sdxl" else output.last_hidden_state
    return layer.flatten(0, 1)[None], getattr(output, "text_embeds", None)


@pytest.mark.parametrize("kind", KINDS)
def test_long_prompts_are_encoded_in_75_token_chunks(kind):
    bundle = build_tiny(kind)
    long_prompt = "a" * 60 + ", " + "b" * 30  # 91 char tokens; the comma (token 61) is 15 back from token 75
    cond = bundle.encode_text([long_prompt, "short"])
    assert cond.context.shape == (2, 154, WIDTH[kind])
    widths = [32, 48] if kind == "sdxl" else [WIDTH[kind]]
    offset = 0
    for index, width in enumerate(widths):
        expected, pooled = chunk_reference(bundle, index, long_prompt, 61)  # cut after the comma
        assert torch.allclose(cond.context[:1, :, offset : offset + width], expected, atol=1e-5)
        if pooled is not None:
            assert torch.allclose(cond.pooled[0], pooled[0], atol=1e-5), "pooled from the first chunk"
        offset += width
    short = bundle.encode_text(["short"]).context
    assert torch.allclose(cond.context[1:, :77], short, atol=1e-5), "a shorter prompt's first chunk is unchanged"
    assert not torch.allclose(cond.context[:1, 77:], cond.context[:1, :77]), "the second chunk is encoded too"


def test_sdxl_time_ids_are_pixel_sizes():
    bundle = build_tiny("sdxl")
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"])

    bundle.components.unet.register_forward_pre_hook(capture, with_kwargs=True)
    cond = bundle.encode_text(PROMPTS)
    bundle.predict(torch.randn(2, 4, 8, 6), torch.tensor([1, 2]), cond)
    expected = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]] * 2)
    assert torch.equal(seen["time_ids"], expected)
    assert torch.equal(seen["text_embeds"], cond.pooled)
    sizes = torch.tensor([[1024.0, 768.0, 32.0, 0.0, 64.0, 48.0]] * 2)  # an image's own size and crop
    bundle.predict(torch.randn(2, 4, 8, 6), torch.tensor([1, 2]), cond, sizes)
    assert torch.equal(seen["time_ids"], sizes)


def test_training_freezes_places_and_restores():
    bundle = build_tiny("sd1")
    unet, te = bundle.components.unet, bundle.components.text_encoders[0]
    unet.to(torch.float64).train()
    te.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    before = {id(p): p.requires_grad for m in (unet, te) for p in m.parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with bundle.training():
            assert not any(p.requires_grad for m in (unet, te, bundle.components.vae) for p in m.parameters())
            assert next(unet.parameters()).dtype == torch.float32
            assert not unet.training and not te.training
            bundle.set_gradient_checkpointing(True)
            assert unet.training and unet.is_gradient_checkpointing
            raise RuntimeError("boom")
    assert next(unet.parameters()).dtype == torch.float64
    assert unet.training and not te.training and not unet.is_gradient_checkpointing
    assert {id(p): p.requires_grad for m in (unet, te) for p in m.parameters()} == before
    assert not te.text_model.embeddings.token_embedding.weight.requires_grad


def test_text_encoder_adapter_gets_gradients_inside_training():
    """encode_text is not wrapped in no_grad: a text-encoder adapter trains through it."""
    bundle = build_tiny("sd1")
    delta = nn.Parameter(torch.zeros(32))
    layer = bundle.components.text_encoders[0].text_model.encoder.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, output: output + delta)
    with bundle.training():
        bundle.encode_text(PROMPTS).context.pow(2).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_unet_adapter_gradients():
    bundle = build_tiny("sd1")
    delta = nn.Parameter(torch.zeros(32))
    layer = bundle.components.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.register_forward_hook(lambda module, args, output: output + delta)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        with bundle.training():
            bundle.set_gradient_checkpointing(checkpointing)
            cond = bundle.encode_text(PROMPTS)
            bundle.predict(latents, torch.tensor([5, 700]), cond).pow(2).mean().backward()
        grads.append(delta.grad.clone())
        delta.grad = None
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_alphas_cumprod_match_the_sd_schedule():
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    ours = ddpm_alphas_cumprod()
    assert ours.shape == (1000,) and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours[0].item() == pytest.approx(1 - 0.00085)
    assert torch.equal(build_tiny("sd1").alphas_cumprod, ours)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_pipeline_loads_offline_with_identical_weights(kind, tmp_path):
    folder = save_tiny_pipeline(kind, tmp_path / kind, seed=3)
    # accelerate 0.21 (the WebUI pin) is too old for transformers 4.46 low_cpu_mem_usage loading
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    expected = build_tiny_components(kind, seed=3)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    assert_same_weights(
        weights(pipe.unet, pipe.vae, encoders), weights(expected.unet, expected.vae, expected.text_encoders)
    )
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert pipe.vae.config.scaling_factor == expected.vae.config.scaling_factor
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    for tok, original in zip(tokenizers, expected.tokenizers):
        assert (
            tok("a cat", padding="max_length", max_length=77).input_ids
            == original("a cat", padding="max_length", max_length=77).input_ids
        )


def test_save_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(TrainTrainError, match="not empty"):
        save_tiny_pipeline("sd1", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unknown_tiny_kind():
    with pytest.raises(TrainTrainError, match="sd1, sd2, sdxl"):
        build_tiny_components("sd3")


def test_tiny_tokenizer_is_char_level():
    tok = tiny_clip_tokenizer()
    assert len(tok) == 514
    ids = tok("ab").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a", "b</w>", "<|endoftext|>"]
    assert tiny_clip_tokenizer("!").pad_token_id == tok.convert_tokens_to_ids("!")


def test_clip_bpe_tokenizer_ids_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINTRAIN_CACHE", str(tmp_path))
    tok = clip_bpe_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert clip_bpe_tokenizer(pad_token="!").pad_token_id == 0
    cached = list((tmp_path / "tokenizers").glob("clip-bpe-*/merges.txt"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 48895


def test_clip_bpe_tokenizer_without_a_clip_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TrainTrainError, match="clip-anytorch"):
        clip_bpe_tokenizer()
