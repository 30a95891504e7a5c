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
