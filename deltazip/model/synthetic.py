"""Small random Llama models for tests and examples (no download needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from deltazip.model.config import LlamaConfig
from deltazip.model.llama import LlamaForCausalLM
from deltazip.model.loader import model_from_state_dict, save_model_dir


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer GQA Llama with a 256-token vocab; keyword overrides replace fields."""
    base = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    return dataclasses.replace(base, **overrides)


def random_state_dict(config: LlamaConfig, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors: normal(0, std) weights, norms around 1."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key.endswith("norm.weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = std * torch.randn(shape, generator=g)
    return state


def random_model(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A LlamaForCausalLM with `random_state_dict` weights."""
    state = {k: v.to(dtype) for k, v in random_state_dict(config, seed).items()}
    return model_from_state_dict(config, state)


def write_random_model(
    path: str | Path, config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random checkpoint (config.json + model.safetensors) into `path` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model_dir(path, config, random_state_dict(config, seed), dtype=dtype)
    return path
