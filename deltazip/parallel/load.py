"""Load only this rank's slices of a checkpoint: host RAM holds one shard per rank, not N full models."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from deltazip.model.config import LlamaConfig
from deltazip.model.llama import LlamaForCausalLM
from deltazip.model.loader import _IGNORED_SUFFIXES, safetensors_files
from deltazip.parallel.gather import read_split
from deltazip.parallel.group import TPGroup
from deltazip.parallel.shard_model import shard_model


def load_sharded_model(
    path: str | Path, tp: TPGroup, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Like `load_model` then `shard_model`, reading each tensor's rank slice straight from safetensors."""
    config = LlamaConfig.from_dir(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plan = shard_model(model, tp)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and key == "lm_head.weight"):
                    continue
                split = plan.split(key)
                if split is None:
                    t = f.get_tensor(key)
                else:
                    handle = f.get_slice(key)
                    t = read_split(handle, tuple(handle.get_shape()), split)
                state[key] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:8]
        raise ValueError(f"checkpoint {path} does not match the sharded Llama config (name, shape): {bad}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
