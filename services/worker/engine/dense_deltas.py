"""Uncompressed (dense) deltas applied per segment: the reference DeltaOps for tests and baselines."""

from __future__ import annotations

import torch

from services.worker.engine.model_runner import Segments

DenseDelta = dict[str, torch.Tensor]  # HF tensor name -> W_ft - W_base


class DenseDeltaOps:
    """DeltaOps over dense per-delta tensors for one row layout (see deltazip.model.context.DeltaOps)."""

    def __init__(self, deltas: dict[str, DenseDelta], segments: Segments, tied_embeddings: bool = False) -> None:
        self.deltas = deltas
        self.tied = tied_embeddings
        self.num_rows = sum(n for _, n in segments)
        self.spans: list[tuple[DenseDelta, int, int]] = []  # (delta tensors, first row, end row)
        start = 0
        for name, n in segments:
            if name is not None:
                if name not in deltas:
                    raise KeyError(f"delta {name!r} is not loaded")
                self.spans.append((deltas[name], start, start + n))
            start += n

    def _weight(self, delta: DenseDelta, name: str) -> torch.Tensor | None:
        w = delta.get(name + ".weight")
        if w is None and name == "lm_head" and self.tied:
            w = delta.get("model.embed_tokens.weight")  # tied: lm_head's delta is the embedding's
        return w

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        # x: [N, in], y: [N, out]
        assert x.shape[0] == self.num_rows, f"{name}: {x.shape[0]} rows, segments cover {self.num_rows}"
        for delta, a, b in self.spans:
            w = self._weight(delta, name)
            if w is not None:
                y[a:b] += x[a:b] @ w.to(x.dtype).T
            bias = delta.get(name + ".bias")
            if bias is not None:
                y[a:b] += bias.to(y.dtype)

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        spans = [(delta[name + ".weight"], a, b) for delta, a, b in self.spans if name + ".weight" in delta]
        if not spans:
            return None
        per_row = weight.expand(x.shape[0], -1).clone()  # [N, hidden]
        for w, a, b in spans:
            per_row[a:b] += w.to(per_row.dtype)
        return per_row

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        # input_ids: [N], h: [N, hidden]
        for delta, a, b in self.spans:
            w = delta.get(name + ".weight")
            if w is not None:
                h[a:b] += w[input_ids[a:b]].to(h.dtype)


class DenseDeltaProvider:
    """Segments -> DenseDeltaOps (None when every row is base). Pass as the engine's deltas_provider."""

    def __init__(self, deltas: dict[str, DenseDelta], tied_embeddings: bool = False) -> None:
        self.deltas = deltas
        self.tied = tied_embeddings

    def __call__(self, segments: Segments) -> DenseDeltaOps | None:
        if all(name is None for name, _ in segments):
            return None
        return DenseDeltaOps(self.deltas, segments, self.tied)
