"""Rebuild a Hugging Face fast tokenizer (tokenizer.json + tokenizer_config.json) from GGUF fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4
# Pre-tokenizers that split every digit apart before the GPT-2 byte-level regex (llama.cpp groups them).
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2_PRES = ("gpt2", "default", "mpt", "olmo", "jais")


@dataclass(frozen=True, slots=True)
class GGUFVocab:
    """The tokenizer fields of a GGUF file."""

    model: str  # tokenizer.ggml.model, "gpt2" = byte-level BPE
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRES:
        return byte_level
    raise ValueError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(_DIGIT_SPLIT_PRES + _GPT2_PRES)}"
    )


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to the GGUF vocabulary."""
    if vocab.model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported; only 'gpt2' (byte-level BPE)")
    token_to_id = {tok: i for i, tok in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    bpe = models.BPE(token_to_id, merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(vocab.pre)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=kind == TOKEN_TYPE_CONTROL, normalized=False)
        for t, kind in zip(vocab.tokens, vocab.token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_tokens(added)
    return tok


def tokenizer_config(vocab: GGUFVocab, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: special tokens and the chat template."""
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": kind == TOKEN_TYPE_CONTROL}
        for i, (t, kind) in enumerate(zip(vocab.tokens, vocab.token_types))
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    }
    cfg: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": vocab.add_bos_token,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "bos_token": vocab.token(vocab.bos_token_id),
        "eos_token": vocab.token(vocab.eos_token_id),
        "unk_token": vocab.token(vocab.unk_token_id),
        "pad_token": vocab.token(vocab.pad_token_id),
        "added_tokens_decoder": added,
    }
    if vocab.chat_template:
        cfg["chat_template"] = vocab.chat_template
    return cfg


def check_tokenizer(tok: Tokenizer, vocab: GGUFVocab) -> None:
    """Every GGUF token must keep its id; special ids must resolve to the same strings."""
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab.tokens):
        raise ValueError(
            f"rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, GGUF has {len(vocab.tokens)}"
        )
    wrong = [i for i, t in enumerate(vocab.tokens) if tok.id_to_token(i) != t]
    if wrong:
        raise ValueError(f"rebuilt tokenizer maps {len(wrong)} ids differently from the GGUF, e.g. id {wrong[0]}")
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(vocab, f"{name}_token_id")
        if token_id is not None and tok.token_to_id(vocab.tokens[token_id]) != token_id:
            raise ValueError(f"{name} token {vocab.tokens[token_id]!r} does not map back to id {token_id}")


def tokenizer_files(vocab: GGUFVocab, model_max_length: int) -> dict[str, str]:
    """File name -> text for tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tok = build_tokenizer(vocab)
    check_tokenizer(tok, vocab)
    cfg = tokenizer_config(vocab, model_max_length)
    special_map = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg[k] is not None}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
    }
