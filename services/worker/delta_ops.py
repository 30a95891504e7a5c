"""StepDeltaOps: the DeltaOps of one forward — rows in segments, each segment one delta slot (or base).

Linears go through the batched delta kernel (`kernels.delta_linear.apply_deltas`) when available,
else the torch reference below; norms and embeddings are dense fp deltas applied per row;
lm_head of a tied-embedding model uses the embedding delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.worker.device_slots import DeviceSlots


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [start, end) of the step use device slot `slot` (None = base model, no delta)."""

    slot: int | None
    start: int
    end: int


def make_segments(rows: Sequence[tuple[int | None, int]]) -> list[Segment]:
    """[(slot, num_rows), ...] in row order -> segments with row offsets; empty ones dropped."""
    segments, start = [], 0
    for slot, num_rows in rows:
        if num_rows:
            segments.append(Segment(slot, start, start + num_rows))
        start += num_rows
    return segments


class StepDeltaOps:
    """DeltaOps for one row layout (tokens of a forward, or sampled rows of compute_logits)."""

    def __init__(self, slots: DeviceSlots, rows: Sequence[tuple[int | None, int]]) -> None:
        self._slots = slots
        self.segments = [s for s in make_segments(rows) if s.slot is not None]
        self.num_rows = sum(n for _, n in rows)

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += x @ Δ(row).T per delta segment. x: [N, in], y: [N, out]."""
        assert x.shape[0] == self.num_rows, f"{name}: {x.shape[0]} rows, layout has {self.num_rows}"
        tensor_name = name + ".weight"
        for seg in self.segments:
            delta = self._slots.linear_dense(seg.slot, tensor_name, x.dtype)  # [out, in]
            if delta is not None:
                y[seg.start:seg.end] += x[seg.start:seg.end] @ delta.T

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row weight [N, H] = base + Δ for delta rows, or None when no row's delta touches it."""
        tensor_name = name + ".weight"
        changed = [(s, self._slots.dense(s.slot, tensor_name)) for s in self.segments]
        changed = [(s, d) for s, d in changed if d is not None]
        if not changed:
            return None
        per_row = weight.to(x.dtype).expand(x.shape[0], -1).clone()  # [N, H]
        for seg, delta in changed:
            per_row[seg.start:seg.end] += delta.to(x.dtype)
        return per_row

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        """h[i] += Δ_embed(row i)[input_ids[i]]. input_ids: [N], h: [N, H]."""
        tensor_name = name + ".weight"
        for seg in self.segments:
            delta = self._slots.dense(seg.slot, tensor_name)  # [V, H]
            if delta is not None:
                h[seg.start:seg.end] += delta[input_ids[seg.start:seg.end]].to(h.dtype)

