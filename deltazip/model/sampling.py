"""Sampling parameters and a batched sampler with per-row parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the generator's seed space


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request (same meaning as the proto's SamplingParams)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # same seed (and prompt) -> same tokens
    stop: tuple[str, ...] = ()  # stop sequences, never part of the output text
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    min_tokens: int = 0  # EOS and stop sequences are ignored before this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop sequences must be non-empty strings, got {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _row_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # Derived from (seed, step) rather than carried along, so recompute-preemption and batch
    # composition cannot change a seeded request's tokens.
    g = torch.Generator(device=device)
    g.manual_seed((seed * _SEED_MIX + step) % (2**63 - 1))
    return g


class Sampler:
    """Samples one token per row; each row has its own SamplingParams."""

    def __init__(self, eos_token_ids: Sequence[int] = ()) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int]
    ) -> torch.Tensor:
        """logits: [S, V] fp32; num_generated[i] = tokens row i already produced -> token ids [S] int64."""
        num_rows = logits.shape[0]
        assert len(params) == num_rows == len(num_generated)
        logits = logits.float().clone()
        self._suppress_eos(logits, params, num_generated)
        out = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            sub = [params[i] for i in rows]
            index = torch.tensor(rows, device=logits.device)
            probs = self._probs(logits[index], sub)
            out[index] = self._draw(probs, sub, [num_generated[i] for i in rows])
        return out

    def _suppress_eos(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int]
    ) -> None:
        """EOS may not be drawn while a row has fewer than min_tokens outputs."""
        if not self.eos_token_ids:
            return
        rows = [i for i, (p, n) in enumerate(zip(params, num_generated)) if n < p.min_tokens]
        if rows:
            row_index = torch.tensor(rows, device=logits.device)[:, None]
            eos_index = torch.tensor(self.eos_token_ids, device=logits.device)
            logits[row_index, eos_index] = float("-inf")

    @staticmethod
    def _probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k, then top-p (renormalised after top-k). [R, V] -> probabilities [R, V]."""
        device, vocab = logits.device, logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temps[:, None]
        if all(p.top_k == 0 and p.top_p == 1.0 for p in params):
            return torch.softmax(logits, dim=-1)
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass of the tokens ranked above it already reaches top_p.
        drop = ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)

    @staticmethod
    def _draw(probs: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
        """One draw per row via argmax(p / Exp(1)) (exponential race); seeded rows use their own noise."""
        noise = torch.empty_like(probs).exponential_()
        for i, (p, step) in enumerate(zip(params, steps)):
            if p.seed is not None:
                noise[i].exponential_(generator=_row_generator(p.seed, step, probs.device))
        return (probs / noise).argmax(dim=-1)
