"""Compile, ahead of serving, every SBMM variant a worker's engine can launch on a packed stack.

Why: Triton and Gluon compile a kernel on the first launch of each variant (its constexprs plus the integer
arguments Triton specializes on), which blocks that launch. The variant of
a call depends on the step: the tuned config follows the rows per segment, the K split the rows and segments
that hold a delta, the segment search's bound the segment count (`sbmm.plan`). A worker that meets a new
combination mid-burst stalls every request of that batch for the compile; a bigger delta cap per batch reaches
more combinations, which is what made 16-delta batches slow in the serving benchmark (docs/serving.md).

`warm_up` enumerates every call the engine can make on one stack, names each call's variant with `sbmm.plan` and
`sbmm.compile_key` (host arithmetic, nothing launched), and launches one representative call per new variant on
scratch rows:
- eager forwards (prefill, mixed and eager decode steps, and the logits rows): T rows in S segments for every
  1 <= S <= max_segments and S <= T <= max_tokens (for each S, T stops where no larger T can change the variant,
  so the cost does not grow with max_tokens);
- CUDA-graph decode forwards (services/worker/graph_deltas.py): each captured batch size B over the padded
  `graph_segments` segments, with every rows hint (`sbmm.rows_bucket` of 1..B) and every power-of-two segments
  hint up to the padded count.
The representative launches read the stack as it is (its slots' contents do not matter) and write scratch rows.
Stacks of sp4 / sp2 words whose segments can reach `sbmm.dense_rows` also compile the dense route's expansion
kernels, the delta alone and base + delta (kernels/delta_linear.py; cuBLAS needs no compile), and sp2 stacks whose
segments can reach `delta_linear.SP2_PREFILL_ROWS` on a Hopper GPU the prefill kernel (kernels/sp2_wgmma.py).

A warm-up can be cut into slices (`deadline`): it stops after the launch that passes the deadline and says it did
not finish; the next call skips the variants in `seen` and goes on. A worker serves requests between slices, so a
cold warm-up (11-29 s on an H100 with an empty Triton cache at 16-64 fine-tunes, docs/serving.md) never holds a
request for longer than about one compile.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

from kernels import sbmm


class Warmed(NamedTuple):
    """What one warm_up call did: the calls it launched, and whether every variant of the stack is now compiled
    (False: it stopped at its deadline; call again)."""

    launched: int
    finished: bool


def warm_up(qweight: torch.Tensor, meta: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor | None,
            bits: int, dtype: torch.dtype, max_tokens: int, max_segments: int, graph_rows: Iterable[int] = (),
            graph_segments: int = 0, tiled: bool = False, sp4: bool = False, sp2: bool = False,
            seen: set | None = None, deadline: float | None = None) -> Warmed:
    """Launch one call per variant of this stack not yet in `seen` (updated; pass one set for all stacks of a
    worker: stacks of one geometry share variants). deadline (time.perf_counter() seconds): stop after the
    launch that passes it, unfinished. CUDA only: elsewhere nothing compiles ahead (the interpreter and the torch
    reference have no variants), and it returns Warmed(0, True) at once."""
    if not compiles_ahead(qweight):
        return Warmed(0, True)
    seen = set() if seen is None else seen
    num_slots, n, _ = qweight.shape
    k = qweight.shape[2] * (16 if meta is None else 64 // bits)  # dense2 words: 16 columns; 2:4 words: 64 / bits
    num_groups = scales.shape[-1]
    geometry = (n, k, bits, num_groups, zeros is not None, meta is None, tiled, sp4, sp2, dtype, num_slots)
    graph_rows = tuple(graph_rows)
    done = (geometry, max_tokens, max_segments, graph_rows, graph_segments)
    if done in seen:  # a stack of the same geometry went through these calls already (q/k/v/o share one)
        return Warmed(0, True)
    x = torch.zeros(max(max_tokens, max(graph_rows, default=1)), k, dtype=dtype, device=qweight.device)
    y = torch.zeros(x.shape[0], n, dtype=dtype, device=qweight.device)
    def plan(t: int, s: int, rows_hint: int | None = None, segments_hint: int | None = None) -> sbmm.Launch:
        return sbmm.plan(x[:t], n, k, bits, num_groups, k // num_groups, zeros is not None, s, rows_hint=rows_hint,
                         segments_hint=segments_hint, dense2=meta is None, sp4=sp4, sp2=sp2)

    launched = 0
    eager = ((t, s, None, None, False, launch) for t, s, launch in _eager_calls(plan, max_tokens, max_segments,
                                                                                qweight.device))
    graph = ((t, s, rows_hint, segments_hint, True, plan(t, s, rows_hint, segments_hint))
             for t, s, rows_hint, segments_hint in _graph_calls(graph_rows, graph_segments, qweight.device))
    for t, s, rows_hint, segments_hint, padded, launch in itertools.chain(eager, graph):
        key = (geometry, sbmm.compile_key(launch, n))
        if key in seen:
            continue
        seen.add(key)
        starts, slots = _segments(t, s, num_slots, padded, qweight.device)
        sbmm.sbmm(x[:t], y[:t], qweight, meta, scales, zeros, starts, slots, bits, rows_hint=rows_hint,
                  segments_hint=segments_hint, tiled=tiled, sp4=sp4, sp2=sp2)
        launched += 1
        if deadline is not None and time.perf_counter() >= deadline:
            return Warmed(launched, False)
    dense_from = (sbmm.dense_rows(qweight.device, bits) if (sp4 or sp2) and sbmm.spmma_device_ok(qweight.device, dtype)
                  else None)
    if dense_from is not None and dense_from <= max_tokens and (geometry, "dense") not in seen:
        # segments of dense_from rows and more run the dense route: its expansion kernel (one variant per stack)
        seen.add((geometry, "dense"))
        rows = torch.empty(sbmm.DEQUANT_BLOCK_N, k, dtype=dtype, device=qweight.device)
        sbmm.dequantize_rows(qweight[0], meta[0], scales[0], bits, k, rows)  # the delta alone (apply_deltas)
        sbmm.dequantize_rows(qweight[0], meta[0], scales[0], bits, k, rows,  # base + delta (merged_linear)
                             base=torch.empty(n, k, dtype=dtype, device=qweight.device))
        launched += 2
    if sp2 and (geometry, "sp2_wgmma") not in seen and _routes_to_sp2_wgmma(x, n, k, k // num_groups, max_tokens):
        # segments of delta_linear.SP2_PREFILL_ROWS+ rows run the prefill kernels: 64-row blocks on kernels/
        # sp2_wgmma.py, 128-row ones on kernels/sp2_wgmma_ws.py (each K split it can take) where N allows
        seen.add((geometry, "sp2_wgmma"))
        from kernels import delta_linear, sp2_wgmma, sp2_wgmma_ws
        from kernels.sbmm_plan import sm_count

        rows = delta_linear.SP2_PREFILL_ROWS
        sp2_wgmma.sp2_wgmma(x[:rows], y[:rows], qweight, meta, scales, [0, rows], [0], 64)
        if n % 128 == 0:
            # blocks: every segment's last one may be partial
            splits = sp2_wgmma_ws.split_choices(n, k, sm_count(x.device), max_tokens // 128 + max_segments)
            for split in splits:
                sp2_wgmma_ws.sp2_wgmma_ws(x[:rows], y[:rows], qweight, meta, scales, [0, rows], [0], split=split)
            launched += 1 + len(splits)
        else:
            sp2_wgmma.sp2_wgmma(x[:rows], y[:rows], qweight, meta, scales, [0, rows], [0], 128)
            launched += 2
    seen.add(done)
    return Warmed(launched, True)


def _routes_to_sp2_wgmma(x: torch.Tensor, n: int, k: int, group_size: int, max_tokens: int) -> bool:
    """Whether kernels/delta_linear.py can route segments of this sp2 stack to kernels/sp2_wgmma.py."""
    from kernels import delta_linear, sp2_wgmma

    rows = delta_linear.SP2_PREFILL_ROWS
    return rows is not None and rows <= max_tokens and sp2_wgmma.supported(x, n, k, group_size)


def warm_up_stacks(stacks: Iterable, dtype: torch.dtype, max_tokens: int, max_segments: int,
                   graph_rows: Iterable[int] = (), graph_segments: int = 0, seen: set | None = None,
                   deadline: float | None = None) -> Warmed:
    """warm_up over a worker's delta stacks in order (services/worker/device_slots.SlotStack: `parts`, `bits`,
    `tiled`, `sp4`, `sp2`; stacks that run no SBMM, `sbmm_readable` false, are skipped), sharing `seen`. With a
    deadline no stack starts after it once this call launched something, and a stack cut at it ends the call
    unfinished: call again with the same `seen` to go on."""
    seen = set() if seen is None else seen
    graph_rows = tuple(graph_rows)
    launched = 0
    for stack in stacks:
        if not stack.sbmm_readable:  # dense fp16 stacks (norms, embeddings)
            continue
        if launched and deadline is not None and time.perf_counter() >= deadline:
            return Warmed(launched, False)
        p = stack.parts
        warmed = warm_up(p["qweight"], p.get("meta"), p["scales"], p.get("zeros"), stack.bits, dtype, max_tokens,
                         max_segments, graph_rows, graph_segments, tiled=stack.tiled, sp4=stack.sp4, sp2=stack.sp2,
                         seen=seen, deadline=deadline)
        launched += warmed.launched
        if not warmed.finished:
            return Warmed(launched, False)
    return Warmed(launched, True)


def compiles_ahead(qweight: torch.Tensor) -> bool:
    """Whether launches on this stack compile variants (CUDA, not under the interpreter)."""
    return qweight.is_cuda and not sbmm.interpreting()


def _eager_calls(plan: Callable[[int, int], sbmm.Launch], max_tokens: int, max_segments: int,
                 device: torch.device) -> Iterator[tuple[int, int, sbmm.Launch]]:
    """(rows T, segments S, its launch) of the eager calls, S = 1..max_segments and T = S..max_tokens, except that
    for each S the rows stop once nothing can change any more: past every tuned config's max_rows bound, with the
    config the largest T in bounds gets, and no K split. Why that is enough: past the max_rows bounds an entry is
    picked by its program bounds, and a launch's programs grow with T, so an entry with `max_programs` that stopped
    matching never matches again and one with `min_programs` that matches keeps matching; the config at T and at
    max_tokens being the same, it is that config all the way up, and under one config the K split only falls as T
    grows (`sbmm.split_k`). (Past the max_rows bounds alone is not enough: the H100 tables split a launch of few
    programs less, then give it back to the catch-all, which splits again, as T grows.)"""
    past_bounds = sbmm.rows_bucket(device, float("inf"))
    for s in range(1, max_segments + 1):
        if s > max_tokens:
            break
        last = plan(max_tokens, s)
        for t in range(s, max_tokens + 1):
            launch = plan(t, s)
            yield t, s, launch
            if (launch.splits == 1 and sbmm.rows_bucket(device, t / s) == past_bounds
                    and (launch.kernel, launch.config, launch.block_m, launch.block_n)
                    == (last.kernel, last.config, last.block_m, last.block_n)):
                break


def _graph_calls(graph_rows: Iterable[int], graph_segments: int, device: torch.device
                 ) -> Iterator[tuple[int, int, int, int]]:
    """(rows B, segments, rows hint, segments hint) of the CUDA-graph calls: each captured batch size B over the
    padded `graph_segments` segments (tensors at the fixed offsets of one index buffer, as GraphDeltaOps keeps
    them), every rows hint and every power-of-two segments hint."""
    if graph_segments <= 0:
        return
    segment_hints = [1 << i for i in range(graph_segments.bit_length() + 1) if 1 << i <= 2 * graph_segments]
    for b in graph_rows:
        for rows_hint in sorted({sbmm.rows_bucket(device, r) for r in range(1, b + 1)}):
            for segments_hint in segment_hints:
                yield b, graph_segments, rows_hint, segments_hint


def _segments(t: int, s: int, num_slots: int, padded: bool, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """T rows in S near-equal segments over slots 0, 1, ... (mod num_slots); padded: both tensors are views of
    one buffer [starts S+1, slots S], the way a CUDA graph's index tensors are laid out."""
    starts = [i * t // s for i in range(s + 1)]
    slots = [i % num_slots for i in range(s)]
    if padded:
        buf = torch.tensor(starts + slots, dtype=torch.int64, device=device)
        return buf[: s + 1], buf[s + 1:]
    return (torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor(slots, dtype=torch.int64, device=device))
