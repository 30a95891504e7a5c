"""SBMM warm-up on CPU: the calls it enumerates cover what the engine launches, and variant keys tell launches
apart the way compiles do. (Compiling ahead is CUDA-only: tests/gpu/test_sbmm_warmup_gpu.py checks no step
compiles after it.)"""

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from kernels import sbmm, sbmm_warmup
from services.worker.graph_deltas import GraphDeltaOps

CPU = torch.device("cpu")


@pytest.mark.parametrize("n, k, bits, sp4", [(4096, 4096, 4, True), (11008, 4096, 4, True), (4096, 11008, 2, False),
                                           (256, 512, 4, False)])
def test_eager_calls_stop_early_and_still_name_every_variant(n, k, bits, sp4):
    """The eager calls stop each segment count's rows where nothing changes any more, yet name the same variants
    as every (T, S) in bounds does (sp4 plans: configs and K splits; portable-kernel plans: configs)."""
    x = torch.zeros(1024, k)
    max_tokens, max_segments = 1024, 18

    def plan(t, s):
        return sbmm.plan(x[:t], n, k, bits, 1, k, False, s, sp4=sp4)

    calls = list(sbmm_warmup._eager_calls(plan, max_tokens, max_segments, CPU))
    every = {sbmm.compile_key(plan(t, s), n) for s in range(1, max_segments + 1) for t in range(s, max_tokens + 1)}
    assert {sbmm.compile_key(launch, n) for _, _, launch in calls} == every
    assert len(calls) < max_segments * max_tokens // 4  # it did stop early
    assert {s for _, s, _ in calls} == set(range(1, max_segments + 1)) and all(t >= s for t, s, _ in calls)
    if sp4:
        assert len({launch.splits for _, _, launch in calls}) > 1  # the K split varies, so the stop rule is exercised


@pytest.mark.parametrize("n, k, bits", [(4096, 4096, 4), (11008, 4096, 4), (4096, 11008, 4), (4096, 4096, 2),
                                        (11008, 4096, 2), (4096, 11008, 2)])
@pytest.mark.parametrize("max_segments", [1, 3, 6])  # an engine with one delta per batch has 3 (+ base + spare)
def test_eager_calls_name_every_variant_of_the_h100_tables(monkeypatch, n, k, bits, max_segments):
    """The same check on the H100 tables (sp4 and sp2 words), whose entries past every max_rows bound include one
    with a program bound (the head entry: few programs, fewer K splits) ahead of the catch-all: the rows must not
    stop where that entry's launch stops splitting, since a larger T leaves it for the catch-all, which splits
    again (the first version of the stop rule did, and a served prefill compiled what the warm-up skipped)."""
    from kernels import sbmm_plan

    monkeypatch.setattr(sbmm_plan, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    x = torch.zeros(2048, k, dtype=torch.float16)
    max_tokens, max_segments = 2048, max_segments

    def plan(t, s):
        return sbmm.plan(x[:t], n, k, bits, k // 128, 128, False, s, sp4=bits == 4, sp2=bits == 2)

    calls = list(sbmm_warmup._eager_calls(plan, max_tokens, max_segments, CPU))
    every = {sbmm.compile_key(plan(t, s), n) for s in range(1, max_segments + 1) for t in range(s, max_tokens + 1)}
    assert {sbmm.compile_key(launch, n) for _, _, launch in calls} == every
    assert len(calls) < max_segments * max_tokens // 2  # it still stops early


def test_graph_calls_hold_every_hint_pair_a_graph_step_can_ask_for():
    """For each captured batch size, every (rows hint, segments hint) GraphDeltaOps derives from a step's
    segments (random steps here) is among the warm-up's padded calls of that size."""
    sizes, graph_segments = (1, 2, 4, 8, 16, 32), 10
    calls = {(t, rows_hint, seg_hint) for t, s, rows_hint, seg_hint in
             sbmm_warmup._graph_calls(sizes, graph_segments, CPU) if s == graph_segments}
    ops = SimpleNamespace(slots=SimpleNamespace(device=CPU))
    rng = random.Random(0)
    for _ in range(500):
        b = rng.choice(sizes)
        live = rng.randint(1, min(b, graph_segments - 1))  # + the padded rows' segment
        cuts = sorted(rng.sample(range(1, b + 1), live))
        segments = [(i, hi - lo) for i, (lo, hi) in enumerate(zip([0, *cuts], cuts))]
        want = (b, GraphDeltaOps.rows_hint_for(ops, segments), GraphDeltaOps.segments_hint_for(segments))
        assert want in calls, want


def test_compile_key_tells_configs_apart_and_not_row_or_segment_counts():
    x = torch.zeros(256, 512)
    key = {}
    for t, s in itertools.product((4, 8, 64, 200), (1, 2, 3, 16)):
        launch = sbmm.plan(x[:t], 256, 512, 4, 4, 128, False, s)
        key[t, s] = sbmm.compile_key(launch, 256)
    assert key[4, 2] == key[8, 2]  # same config (4 and 8 rows per segment -> one tuned entry), same segments
    assert key[4, 2] != key[200, 2]  # 2 vs 100 rows per segment: another config
    assert key[8, 2] == key[4, 1] == key[64, 16]  # 4 rows per segment at any segment count: one variant
    assert key[64, 1] != key[64, 16]  # 64 vs 4 rows per segment: another config
    assert len({key[t, s] for t, s in key}) < len(key)


def test_warm_up_launches_nothing_without_cuda():
    qweight = torch.zeros(2, 64, 4, dtype=torch.int32)
    meta = torch.zeros(2, 64, 4, dtype=torch.int32)
    scales = torch.ones(2, 64, 1, dtype=torch.float16)
    assert sbmm_warmup.warm_up(qweight, meta, scales, None, 4, torch.float16, 32, 4) == (0, True)


def test_a_warm_up_cut_into_slices_launches_each_variant_once_and_then_finishes(monkeypatch):
    """With a deadline, warm_up stops after the launch that passes it and says it did not finish; calls with the
    same `seen` go on where it stopped. The slices together launch exactly the variants of one uncut warm-up,
    each once, and a call after the last finds nothing. (The launches are recorded, not run: a fake clock
    advances one second per launch.)"""
    clock = [0.0]
    launches = []

    def fake_sbmm(x, y, *args, rows_hint=None, segments_hint=None, **kwargs):
        launches.append((x.shape[0], rows_hint, segments_hint))
        clock[0] += 1.0

    monkeypatch.setattr(sbmm_warmup, "compiles_ahead", lambda qweight: True)
    monkeypatch.setattr(sbmm, "sbmm", fake_sbmm)
    monkeypatch.setattr(sbmm_warmup.time, "perf_counter", lambda: clock[0])
    qweight = torch.zeros(4, 4096, 4096 // 16, dtype=torch.int32)  # 4-bit 2:4 words: 16 columns each
    meta = torch.zeros(4, 4096, 4096 // 16, dtype=torch.int16)
    scales = torch.ones(4, 4096, 32, dtype=torch.float16)
    args = (qweight, meta, scales, None, 4, torch.float16, 512, 16)
    graphs = {"graph_rows": (1, 2, 4, 8), "graph_segments": 7, "sp4": True}  # sp4 plans: K splits vary

    whole = sbmm_warmup.warm_up(*args, **graphs, seen=set())
    assert whole.finished and whole.launched == len(launches) >= 4
    every, launches[:] = list(launches), []

    seen, slices = set(), []
    for _ in range(100):
        warmed = sbmm_warmup.warm_up(*args, **graphs, seen=seen, deadline=clock[0] + 1.5)
        slices.append(warmed)
        if warmed.finished:
            break
    assert slices[-1].finished and not any(w.finished for w in slices[:-1])
    assert all(w.launched == 2 for w in slices[:-1])  # the launch that passed the deadline was the last one
    assert launches == every  # the same calls in the same order, none twice
    assert sbmm_warmup.warm_up(*args, **graphs, seen=seen, deadline=clock[0]) == (0, True)


def test_warm_up_compiles_the_sp2_prefill_kernels_once_per_geometry(monkeypatch):
    """An sp2 stack whose segments can reach delta_linear.SP2_PREFILL_ROWS on a Hopper GPU also launches the
    prefill kernels (one segment of that many rows on slot 0): kernels/sp2_wgmma.py's 64-row blocks and
    kernels/sp2_wgmma_ws.py at each K split a launch can take (N 256, K 2048 on 132 SMs: up to 16 tiles, so
    always 2), and not again
    for a stack of the same geometry; none when max_tokens stays under the threshold. (Launches recorded, not
    run.)"""
    from kernels import delta_linear, sbmm_plan, sp2_wgmma, sp2_wgmma_ws

    launches = []
    monkeypatch.setattr(delta_linear, "SP2_PREFILL_ROWS", 128)
    monkeypatch.setattr(sbmm_warmup, "compiles_ahead", lambda qweight: True)
    monkeypatch.setattr(sbmm_warmup, "_routes_to_sp2_wgmma",
                        lambda x, n, k, group, max_tokens: max_tokens >= delta_linear.SP2_PREFILL_ROWS)
    monkeypatch.setattr(sbmm_plan, "sm_count", lambda device: 132)
    monkeypatch.setattr(sbmm, "sbmm", lambda *a, **kw: None)
    monkeypatch.setattr(sp2_wgmma, "sp2_wgmma", lambda x, y, q, m, s, starts, slots, block_m: launches.append((
        "pipelined", x.shape[0], y.shape, list(starts), list(slots), block_m)))
    monkeypatch.setattr(sp2_wgmma_ws, "sp2_wgmma_ws", lambda x, y, q, m, s, starts, slots, split: launches.append((
        "ws", x.shape[0], y.shape, list(starts), list(slots), split)))
    qweight = torch.zeros(2, 256, 2048 // 32, dtype=torch.int32)  # sp2 words: 32 columns each
    meta = torch.zeros_like(qweight)
    scales = torch.ones(2, 256, 16, dtype=torch.float16)
    rows = delta_linear.SP2_PREFILL_ROWS
    seen = set()
    sbmm_warmup.warm_up(qweight, meta, scales, None, 2, torch.float16, 512, 4, sp2=True, seen=seen)
    one = (rows, (rows, 256), [0, rows], [0])
    assert launches == [("pipelined", *one, 64), ("ws", *one, 2)]
    sbmm_warmup.warm_up(qweight.clone(), meta, scales, None, 2, torch.float16, 1024, 4, sp2=True, seen=seen)
    assert len(launches) == 2
    sbmm_warmup.warm_up(qweight, meta, scales, None, 2, torch.float16, rows - 1, 4, sp2=True)
    assert len(launches) == 2


def test_the_sp2_prefill_kernel_is_not_warmed_while_the_route_is_off(monkeypatch):
    """delta_linear.SP2_PREFILL_ROWS None: no stack routes to kernels/sp2_wgmma.py, so none compiles it."""
    from kernels import delta_linear

    monkeypatch.setattr(delta_linear, "SP2_PREFILL_ROWS", None)
    x = torch.zeros(1, 512, dtype=torch.float16)
    assert not sbmm_warmup._routes_to_sp2_wgmma(x, 256, 512, 128, 4096)
