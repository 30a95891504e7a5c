"""Convert a llama-architecture GGUF file into a Hugging Face model folder.

Every tensor is dequantized (any GGUF quant type) and stored as fp16 safetensors by default; q_proj and
k_proj rows are un-permuted back to HF's rotate-half layout; config.json, tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json come from GGUF metadata.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from deltazip.convert.gguf_tokenizer import GGUFVocab, tokenizer_files
from deltazip.model.config import LlamaConfig, RopeScaling
from deltazip.model.loader import save_model_dir

log = structlog.get_logger(__name__)

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    """e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
        return f"model.layers.{index}.{_LAYER_NAMES[part]}.{suffix}"
    if stem not in _GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return f"{_GLOBAL_NAMES[stem]}.{suffix}"


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's half-split order.

    Per head, llama.cpp stores row (i, half) at position 2*i + half; HF stores it at half*d/2 + i.
    """
    out_features = w.shape[0]
    half = out_features // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader: GGUFReader, vocab: GGUFVocab, tied: bool) -> LlamaConfig:
    """LlamaConfig from the `llama.*` metadata keys."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama'")
    num_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = _field(reader, "llama.attention.key_length") or _field(reader, "llama.rope.dimension_count")
    scaling = None
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", factor=float(_field(reader, "llama.rope.scaling.factor")))
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported; only 'linear' or none")
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(vocab.tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", num_heads)),
        head_dim=int(head_dim) if head_dim else hidden // num_heads,
        # Stored as float32: take its shortest decimal form (1e-05, not 9.99999974e-06).
        rms_norm_eps=float(str(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)))),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings=tied,
        bos_token_id=vocab.bos_token_id,
        eos_token_ids=() if vocab.eos_token_id is None else (vocab.eos_token_id,),
        pad_token_id=vocab.pad_token_id,
    )


def read_vocab(reader: GGUFReader) -> GGUFVocab:
    """The tokenizer.* fields."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens; cannot rebuild the tokenizer")
    return GGUFVocab(
        model=_field(reader, "tokenizer.ggml.model"),
        pre=_field(reader, "tokenizer.ggml.pre", "default"),
        tokens=list(tokens),
        token_types=list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))),
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def read_tensors(reader: GGUFReader, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantized, un-permuted tensors under HF names, with shapes checked against the GGUF."""
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ValueError("GGUF has rope_freqs (llama3 rope scaling); converting it is not supported")
        name = hf_tensor_name(t.name)
        w = dequantize(t.data, t.tensor_type)  # numpy, shape reversed from GGUF's ne order = HF shape
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if w.shape != expected:
            raise ValueError(f"{t.name}: dequantized shape {w.shape} != GGUF shape {expected}")
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, config.num_key_value_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        state[name] = torch.from_numpy(w if w.flags.writeable else w.copy()).to(dtype)
    return state


def check_against_model_shapes(config: LlamaConfig, state: dict[str, torch.Tensor]) -> None:
    """The converted tensors must be exactly what LlamaForCausalLM(config) expects."""
    from deltazip.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:6]
        raise ValueError(f"converted tensors do not match the Llama config: {diff}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a HF folder for `gguf_path` at `out_dir` (must not exist); atomic: temp folder + rename."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output folder")
    start = time.perf_counter()
    log.info("gguf_convert_start", gguf=str(gguf_path), out=str(out_dir), dtype=str(dtype))
    reader = GGUFReader(str(gguf_path))
    vocab = read_vocab(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = read_config(reader, vocab, tied)
    if config.vocab_size != len(vocab.tokens):
        raise ValueError(f"llama.vocab_size {config.vocab_size} != {len(vocab.tokens)} tokenizer tokens")
    state = read_tensors(reader, config, dtype)
    check_against_model_shapes(config, state)
    log.info("gguf_tensors_dequantized", num_tensors=len(state), seconds=round(time.perf_counter() - start, 2))

    files = tokenizer_files(vocab, config.max_position_embeddings)
    generation = {"bos_token_id": vocab.bos_token_id, "eos_token_id": vocab.eos_token_id,
                  "pad_token_id": vocab.pad_token_id}
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_model_dir(tmp, config, state, dtype=dtype, extra_files=files)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and safetensors create private files
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("gguf_convert_done", out=str(out_dir), seconds=round(time.perf_counter() - start, 2),
             layers=config.num_hidden_layers, vocab=config.vocab_size)
    return out_dir
