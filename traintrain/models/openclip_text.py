"""OpenCLIP's text transformer (SD2, SDXL's second encoder) run so that LoRA hooks reach q, k, v and out_proj.

`nn.MultiheadAttention` fuses q/k/v into one `in_proj_weight` and calls neither them nor `out_proj` as modules, so
while encoding, each attention runs split: through three Linear views over `in_proj_weight` and a call of
`out_proj`. Only the forward changes, never a weight; the saved kohya names are `…self_attn_{q,k,v,out}_proj`,
all four of which the WebUI's Lora loader needs to rebuild the fused layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTokenizer

from traintrain.models.tokenizer import chunked_token_ids

OPEN_CLIP_PAD = 0  # open_clip.tokenize pads with 0 after the end token
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class ProjectionView(nn.Linear):
    """q, k or v of a fused `nn.MultiheadAttention` as a Linear: weight and bias are live slices of `in_proj_*`."""

    def __init__(self, attention: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)  # no parameters of its own
        self.in_features = self.out_features = attention.embed_dim
        self.index = index
        object.__setattr__(self, "attention", attention)  # a plain reference, not a child module

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.index * self.out_features : (self.index + 1) * self.out_features]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._rows(self.attention.in_proj_weight)

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        bias = self.attention.in_proj_bias
        return None if bias is None else self._rows(bias)


class SplitAttention:
    """Runs one `nn.MultiheadAttention` through its q/k/v views and `out_proj` (same maths, hookable layers)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        self.attention = attention
        self.views = {name: ProjectionView(attention, i) for i, name in enumerate(PROJECTIONS)}

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """`nn.MultiheadAttention.forward`, same signature, without attention weights (OpenCLIP asks for none)."""
        mha = self.attention
        if key_padding_mask is not None:
            raise NotImplementedError("key_padding_mask is not supported by the split attention.")
        if not mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        heads, batch = mha.num_heads, query.shape[0]
        q, k, v = (
            view(x).unflatten(-1, (heads, -1)).transpose(1, 2)
            for view, x in zip(self.views.values(), (query, key, value))
        )
        mask = attn_mask
        if mask is not None:
            mask = ~mask if mask.dtype == torch.bool else mask.to(q.dtype)  # MHA: True = masked; SDPA: True = kept
            mask = mask.view(batch, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask
        dropout = mha.dropout if mha.training else 0.0
        causal = is_causal and mask is None  # MHA takes is_causal as a hint next to the mask; SDPA wants one of them
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = mha.out_proj(out.transpose(1, 2).flatten(2))
        return (out if mha.batch_first else out.transpose(0, 1)), None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route the attention's calls through `forward` for the duration (an instance attribute, then undone)."""
        previous = vars(self.attention).get("forward")
        self.attention.forward = self.forward
        try:
            yield
        finally:
            if previous is None:
                del self.attention.forward
            else:
                self.attention.forward = previous


class OpenClipText:
    """An open_clip CLIP text tower (`token_embedding`, `positional_embedding`, `transformer.resblocks`, `ln_final`,
    `text_projection`, `attn_mask`), tokenized like `open_clip.tokenize` with a transformers CLIP tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: CLIPTokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.blocks = list(model.transformer.resblocks)
        self.splits = {f"transformer.resblocks.{i}.attn": SplitAttention(b.attn) for i, b in enumerate(self.blocks)}

    @property
    def num_layers(self) -> int:
        """Number of residual attention blocks."""
        return len(self.blocks)

    def module_for(self, name: str) -> nn.Module:
        """The module at `name` (relative to the model); `…attn.q_proj` / `k_proj` / `v_proj` are the views."""
        head, _, leaf = name.rpartition(".")
        if head in self.splits and leaf in PROJECTIONS:
            return self.splits[head].views[leaf]
        return self.model.get_submodule(name)

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, chunks, 77), end-token positions (B, chunks)): per 75-token chunk start, text, end, then zeros."""
        ids = chunked_token_ids(self.tokenizer, prompts)
        eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)
        return ids.masked_fill(torch.arange(ids.shape[-1]) > eos[..., None], OPEN_CLIP_PAD), eos

    def hidden_states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate layer, last layer) for `token_ids` on the model's device, batch first, no final norm."""
        model = self.model
        x = model.token_embedding(ids)
        x = x + model.positional_embedding.to(x.dtype)
        batch_first = getattr(model.transformer, "batch_first", False)
        x = x if batch_first else x.transpose(0, 1)
        with contextlib.ExitStack() as stack:
            for split in self.splits.values():
                stack.enter_context(split.installed())
            for block in self.blocks[:-1]:
                x = block(x, attn_mask=model.attn_mask)
            penultimate, x = x, self.blocks[-1](x, attn_mask=model.attn_mask)
        if not batch_first:
            penultimate, x = penultimate.transpose(0, 1), x.transpose(0, 1)
        return penultimate, x

    def pool(self, last: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """The projected, final-normed output at the end token (SDXL's pooled text embedding)."""
        normed = self.model.ln_final(last)
        pooled = normed[torch.arange(len(normed), device=normed.device), eos]
        projection = self.model.text_projection
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection
