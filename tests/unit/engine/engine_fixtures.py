"""A tiny float64 Llama with dense deltas, and a plain greedy reference over merged weights."""

from __future__ import annotations

import pytest
import torch

from deltazip.model.loader import model_from_state_dict
from deltazip.model.synthetic import random_state_dict, tiny_config
from services.worker.engine.dense_deltas import DenseDeltaProvider
from services.worker.engine.engine import EngineConfig, LLMEngine

CFG = tiny_config(vocab_size=128, max_position_embeddings=256)
DTYPE = torch.float64  # float64 so base + delta and merged weights agree on every argmax


class Fixture:
    def __init__(self, num_deltas: int = 3, cfg=CFG) -> None:
        self.cfg = cfg
        self.base_sd = {k: v.to(DTYPE) for k, v in random_state_dict(cfg, seed=0).items()}
        g = torch.Generator().manual_seed(100)
        self.deltas = {
            f"ft{i}": {k: 0.04 * torch.randn(v.shape, generator=g, dtype=DTYPE) for k, v in self.base_sd.items()}
            for i in range(num_deltas)
        }
        self.merged = {None: model_from_state_dict(cfg, self.base_sd)}
        for name, delta in self.deltas.items():
            self.merged[name] = model_from_state_dict(cfg, {k: v + delta[k] for k, v in self.base_sd.items()})
        self._ref_cache: dict = {}

    def engine(self, **overrides) -> LLMEngine:
        kwargs = {k: overrides.pop(k) for k in ("tokenizer", "is_delta_ready", "deltas_provider", "clock",
                                                "swap_weights") if k in overrides}
        kwargs.setdefault("deltas_provider", DenseDeltaProvider(self.deltas, self.cfg.tie_word_embeddings))
        # swap mode writes into the parameters: give it its own copy of the base weights
        state = {k: v.clone() for k, v in self.base_sd.items()} if "swap_weights" in kwargs else self.base_sd
        base = model_from_state_dict(self.cfg, state)
        return LLMEngine(base, EngineConfig(**{"block_size": 4, **overrides}), **kwargs)

    @torch.inference_mode()
    def reference(self, delta: str | None, prompt: list[int], max_tokens: int, eos: int | None = 2) -> list[int]:
        """Greedy tokens of the merged model, full recompute each step; stops at EOS (included)."""
        key = (delta, tuple(prompt), max_tokens, eos)
        if key not in self._ref_cache:
            model, ids, out = self.merged[delta], list(prompt), []
            for _ in range(max_tokens):
                nxt = int(model.forward_dense(torch.tensor([ids]))[0, -1].argmax())
                out.append(nxt)
                ids.append(nxt)
                if nxt == eos:
                    break
            self._ref_cache[key] = out
        return self._ref_cache[key]


def prompts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 30, vocab: int = CFG.vocab_size) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls run faster on one thread, and a shared 2-core box makes OpenMP threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
