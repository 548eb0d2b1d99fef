"""CLIP tokenizers built offline: a char-level one for the tiny models and the real 49,408-token CLIP vocabulary."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPTokenizer

from traintrain.errors import TrainTrainError
from traintrain.files import atomic_write_text

MAX_TOKENS = 77  # bos + 75 tokens + eos: one chunk, as the WebUI encodes prompts
CHUNK_TOKENS = MAX_TOKENS - 2  # text tokens per chunk
COMMA_BACKTRACK = 20  # a full chunk breaks after its last comma when that is at most this many tokens back (WebUI)
START, END = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("open_clip", "clip")  # open_clip ships inside the WebUI, clip-anytorch standalone
BPE_MERGES = 49152 - 256 - 2  # OpenAI's recipe: the first 48,894 merges of the file

Vocabulary = tuple[dict[str, int], list[str]]  # token -> id, merge lines ("a b")


def cache_dir() -> Path:
    """Folder for generated tokenizer files: $TRAINTRAIN_CACHE/tokenizers, else ~/.cache/traintrain/tokenizers."""
    override = os.environ.get("TRAINTRAIN_CACHE")
    if override:
        return Path(override) / "tokenizers"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "traintrain" / "tokenizers"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes of GPT-2/CLIP byte-level BPE, in the order of the CLIP vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _vocabulary(merges: list[str]) -> Vocabulary:
    """Bytes, bytes ending a word, merged pairs, then the two special tokens (OpenAI's id order)."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [START, END]
    return {token: i for i, token in enumerate(tokens)}, merges


def _tokenizer(name: str, build: Callable[[], Vocabulary], pad_token: str) -> CLIPTokenizer:
    """A CLIPTokenizer from vocab.json / merges.txt cached under `name`, written by `build` when missing."""
    folder = cache_dir() / name
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        vocab, merges = build()
        atomic_write_text(merges_path, "\n".join(["#version: 0.2", *merges]) + "\n")
        atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return CLIPTokenizer(
        str(vocab_path),
        str(merges_path),
        unk_token=END,
        bos_token=START,
        eos_token=END,
        pad_token=pad_token,
        model_max_length=MAX_TOKENS,
    )


def tiny_clip_tokenizer(pad_token: str = END) -> CLIPTokenizer:
    """Char-level CLIP tokenizer (514 tokens, no merges) for the tiny models: every text tokenizes, nothing to fetch."""
    return _tokenizer("tiny-char", lambda: _vocabulary([]), pad_token)


def bpe_vocabulary_file() -> Path:
    """The OpenAI BPE file shipped by open_clip or clip(-anytorch), found without importing either package."""
    for package in BPE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / BPE_FILE
            if path.is_file():
                return path
    raise TrainTrainError(
        f"The CLIP vocabulary file {BPE_FILE} was not found: install it with "
        "'pip install --no-deps clip-anytorch==2.6.0' (or open_clip_torch) and try again."
    )


def clip_bpe_tokenizer(pad_token: str = END) -> CLIPTokenizer:
    """The real CLIP tokenizer (49,408 tokens, what SD1/SD2/SDXL use), built from the locally installed BPE file."""
    path = bpe_vocabulary_file()
    data = path.read_bytes()

    def build() -> Vocabulary:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
        return _vocabulary(lines[1 : 1 + BPE_MERGES])

    return _tokenizer(f"clip-bpe-{hashlib.sha256(data).hexdigest()[:16]}", build, pad_token)


def split_chunks(ids: list[int], comma: int | None) -> list[list[int]]:
    """Text token ids cut into chunks of at most 75, a full chunk broken after its last comma when that is at most
    20 tokens back (the WebUI's comma padding backtrack); always at least one (maybe empty) chunk."""
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma = -1
    for token in ids:
        if len(current) == CHUNK_TOKENS:
            cut = last_comma + 1 if last_comma >= 0 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK else CHUNK_TOKENS
            chunks.append(current[:cut])
            current, last_comma = current[cut:], -1
        if token == comma:
            last_comma = len(current)
        current.append(token)
    if current or not chunks:
        chunks.append(current)
    return chunks


def chunked_token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """(prompts, chunks, 77) ids: each prompt in 75-token chunks, each `[start] tokens [end] padding`, as the WebUI
    encodes long prompts (chunks encoded separately, then concatenated); shorter prompts get empty chunks."""
    texts = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma
    pieces = [split_chunks(ids, comma) for ids in texts]
    count = max(len(chunks) for chunks in pieces)
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        [[start, *chunk, end] + [pad] * (CHUNK_TOKENS - len(chunk)) for chunk in chunks + [[]] * (count - len(chunks))]
        for chunks in pieces
    ]
    return torch.tensor(rows, dtype=torch.long)
