"""Tiny Llama-shaped checkpoints written with safetensors (no model code needed for format tests)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, LAYERS = 64, 128, 96, 2


def llama_like_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Tensor names and shapes of a 2-layer Llama, bf16."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })  # fmt: skip
    return {n: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for n, s in shapes.items()}


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """HF folder: config.json, tokenizer stand-in, one or more safetensors shards (+ index)."""
    path.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "vocab_size": VOCAB, "torch_dtype": "bfloat16", "_name_or_path": str(path)}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, path / fname)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def fine_tune_of(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Small-magnitude changes to every tensor except layer 1's k_proj (left exactly equal)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base.items():
        if name == "model.layers.1.self_attn.k_proj.weight":
            out[name] = w.clone()
        else:
            out[name] = (w.float() + torch.randn(w.shape, generator=g) * 0.01).to(w.dtype)
    return out


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """base, ft (of base), other_base (different weights, same architecture)."""
    root = tmp_path_factory.mktemp("ckpts")
    base = llama_like_tensors(0)
    return {
        "base": write_checkpoint(root / "base", base),
        "base_resharded": write_checkpoint(root / "base_resharded", base, shards=3),
        "ft": write_checkpoint(root / "ft", fine_tune_of(base, 1), shards=2),
        "other_base": write_checkpoint(root / "other_base", llama_like_tensors(7)),
    }


@pytest.fixture(scope="module")
def dense_artifact(ckpts, tmp_path_factory):
    """A dense fp16 delta artifact of ckpts' ft against its base."""
    from deltazip.artifact import write_dense_delta

    out = tmp_path_factory.mktemp("dense") / "delta"
    write_dense_delta(ckpts["base"], ckpts["ft"], out)
    return out
