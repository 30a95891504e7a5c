"""StepProfile: where a worker's time goes, as cumulative (count, seconds) per phase of its engine loop.

Phases, in step order:
- `swap` (swap mode: copying a model's weights in, counted only on steps that swap);
- `schedule`;
- one forward phase per step kind: `prefill` (any prompt chunk in the batch), `decode_graph` (decode-only,
  replayed from a CUDA graph), `decode_eager` (decode-only, eager). Sampling is included; its `.tolist()` waits
  for the GPU, so a forward phase is GPU time plus launch overhead;
- `results` (stop checks, detokenizing);
- `warmup` (CUDA: compiling the SBMM variants of delta stacks that appeared since the last finished warm-up,
  kernels/sbmm_warmup.py; in slices of model_runner.WARMUP_SLICE_S, while idle or before a step's forward, until
  every variant of the new stack layout is compiled).
Nested, not a step phase: `compile` counts the kernel variants compiled inside a step's forward (CUDA,
kernels/compile_watch.py; a `warmup` compiles on purpose and is not counted), with the seconds of the forwards
that compiled (the stall is at most that; they are in their own phase too). Nested too: `dense_route` counts the
forwards that ran some delta segment on the dense route (a long prompt on a delta as one GEMM on base + Δ, or Δ
expanded and added; kernels/delta_linear.py), with their seconds.
The engine loop adds `deliver` (tokens to the request streams, stats, residency bookkeeping) and `idle` (waiting
for work, or for a delta every waiting request needs). The totals only grow: a reader takes two snapshots and
subtracts (the Worker Status RPC returns them; bench/replay.py does that per benchmark point).

SegmentStats: how the delta rows of the steps split into segments (one fine-tune's consecutive token rows in one
step: one SBMM segment each), per step kind and row bin, cumulative like the phases. A prefill step's segments
decide which kernel route and config its SBMM launches take (docs/kernels.md), and mixed steps carry one segment
per running fine-tune besides the prompts' own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("swap", "schedule", "warmup", "prefill", "decode_graph", "decode_eager", "results", "deliver", "idle",
          "compile", "dense_route")


class StepProfile:
    """Cumulative (count, seconds) per phase; written by the engine loop thread, read from any thread."""

    def __init__(self) -> None:
        # every key exists from the start, so a reader never sees the dict change size
        self._totals: dict[str, tuple[int, float]] = {phase: (0, 0.0) for phase in PHASES}

    def add(self, phase: str, seconds: float, count: int = 1) -> None:
        assert phase in self._totals, f"unknown step phase {phase!r}; phases: {PHASES}"
        num, total = self._totals[phase]
        self._totals[phase] = (num + count, total + seconds)  # one assignment: readers see the old pair or the new

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """{phase: (count, seconds)} since the engine started."""
        return dict(self._totals)


def phase_deltas(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]],
                 wall_s: float) -> dict[str, dict[str, float]]:
    """Per phase between two snapshots: count, seconds, mean ms and share of `wall_s` (phases that ran only)."""
    out = {}
    for phase, (count, seconds) in after.items():
        c0, s0 = before.get(phase, (0, 0.0))
        num, secs = count - c0, seconds - s0
        if num > 0:
            out[phase] = {"count": num, "seconds": round(secs, 4), "mean_ms": round(1e3 * secs / num, 3),
                          "share": round(secs / wall_s, 4) if wall_s > 0 else 0.0}
    return out


SEGMENT_STEPS = ("prefill", "decode")  # the step kinds SegmentStats tells apart (decode: graph or eager)


def segment_bin(rows: int) -> int:
    """The power of two at or below `rows` (>= 1): the bin of a segment of that many rows."""
    return 1 << (rows.bit_length() - 1)


class SegmentStats:
    """Cumulative delta segments per (step kind, row bin): (segments, rows). Base rows and padding are not delta
    segments. Written by the engine thread, read from any thread (each step swaps in a new dict)."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, int], tuple[int, int]] = {}

    def add(self, step: str, segments) -> None:
        """One step's (delta or None, rows) segments."""
        assert step in SEGMENT_STEPS, f"unknown step kind {step!r}; kinds: {SEGMENT_STEPS}"
        totals = None
        for delta, rows in segments:
            if delta is None or rows <= 0:
                continue
            totals = dict(self._totals) if totals is None else totals
            key = (step, segment_bin(rows))
            num, total = totals.get(key, (0, 0))
            totals[key] = (num + 1, total + rows)
        if totals is not None:
            self._totals = totals

    def snapshot(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(step kind, bin): (segments, rows)} since the engine started (bins that saw a segment)."""
        return dict(self._totals)


def segment_deltas(before: dict[tuple[str, int], tuple[int, int]],
                   after: dict[tuple[str, int], tuple[int, int]]) -> dict[str, dict[str, list[int]]]:
    """Per step kind between two snapshots: {bin (as text): [segments, rows]}, bins in increasing order."""
    out: dict[str, dict[str, list[int]]] = {}
    for (step, low), (num, rows) in sorted(after.items()):
        n0, r0 = before.get((step, low), (0, 0))
        if num > n0:
            out.setdefault(step, {})[str(low)] = [num - n0, rows - r0]
    return out
