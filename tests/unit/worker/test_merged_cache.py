"""MergedCache: which segments it takes, LRU eviction within its budget, and slot generations."""

import pytest
import torch

from services.worker.merged_cache import MergedCache

MB = 1 << 20


def weight(mb: int) -> torch.Tensor:
    return torch.zeros(mb * MB // 2, dtype=torch.float16)  # mb MiB


def test_a_long_segment_admits_its_slot_and_then_shorter_ones_use_it():
    cache = MergedCache(8 * MB, admit_rows=256, use_rows=64)
    assert not cache.wants(3, 1, 200)  # not kept, under admit_rows
    assert cache.wants(3, 1, 256)
    assert cache.reserve(3, 1, 2 * MB)
    cache.put(3, 1, "q", weight(2))
    assert cache.wants(3, 1, 64) and not cache.wants(3, 1, 63)  # kept: from use_rows
    assert not cache.wants(3, 2, 200)  # the slot was written again: its kept weights are stale
    assert cache.lookup(3, 1, "q") is not None and cache.lookup(3, 1, "o") is None
    assert cache.lookup(3, 2, "q") is None
    assert cache.stats()["hits"] == 1 and cache.stats()["builds"] == 1


def test_reserve_evicts_other_slots_least_recently_used_first_and_keeps_its_own():
    cache = MergedCache(6 * MB, admit_rows=1)
    for slot in (0, 1, 2):
        assert cache.reserve(slot, 0, 2 * MB)
        cache.put(slot, 0, "w", weight(2))
    assert cache.used_bytes == 6 * MB
    cache.lookup(0, 0, "w")  # slot 0 used last: 1 is now the oldest
    assert cache.reserve(2, 0, 2 * MB)  # room for a second weight of slot 2: slot 1 goes
    cache.put(2, 0, "w2", weight(2))
    assert cache.kept_slots() == [0, 2] and cache.used_bytes == 6 * MB and cache.evictions == 1
    assert cache.reserve(2, 0, 2 * MB)  # slot 0 goes, slot 2's own stay
    assert cache.kept_slots() == [2] and cache.used_bytes == 4 * MB
    assert not cache.reserve(2, 0, 4 * MB)  # 4 + 4 > 6 even alone: refused, nothing evicted
    assert cache.kept_slots() == [2]


def test_a_stale_generation_is_dropped_before_the_new_one_is_kept():
    cache = MergedCache(4 * MB, admit_rows=1)
    assert cache.reserve(5, 1, 3 * MB)
    cache.put(5, 1, "w", weight(3))
    assert cache.reserve(5, 2, 3 * MB)  # generation 2: generation 1's 3 MiB are freed first
    assert cache.used_bytes == 0 and cache.kept_slots() == []
    cache.put(5, 2, "w", weight(3))
    assert cache.lookup(5, 2, "w") is not None and cache.used_bytes == 3 * MB


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be positive"):
        MergedCache(0)
    with pytest.raises(ValueError, match="must be positive"):
        MergedCache(MB, admit_rows=0)


def test_device_slots_generation_counts_writes_and_drops():
    from deltazip.artifact.delta_tensor import DeltaTensor
    from services.worker.device_slots import DeviceSlots

    name = "model.layers.0.mlp.up_proj.weight"
    slots = DeviceSlots(2, "cpu", torch.float32, {name}, tie_word_embeddings=False)
    assert slots.merged_cache is None and (slots.generation(0), slots.generation(1)) == (0, 0)
    delta = {name: DeltaTensor(name=name, kind="dense", shape=(4, 4), delta=torch.zeros(4, 4, dtype=torch.float16))}
    slots.write(0, "ft", delta)
    assert (slots.generation(0), slots.generation(1)) == (2, 0)  # the write releases the slot first, then fills it
    slots.drop(0)
    assert slots.generation(0) == 3


def test_shrink_to_used_stops_growth_but_keeps_what_is_kept():
    """After an expansion ran out of device memory the budget becomes what is kept: those weights still serve, no
    new slot is admitted beyond them."""
    cache = MergedCache(8 * MB, admit_rows=1)
    assert cache.reserve(0, 0, 2 * MB)
    cache.put(0, 0, "w", weight(2))
    cache.shrink_to_used()
    assert cache.budget_bytes == 2 * MB and cache.lookup(0, 0, "w") is not None
    assert not cache.reserve(0, 0, 1)  # its own 2 MiB + 1 byte no longer fit
    assert cache.reserve(1, 0, 2 * MB) and cache.kept_slots() == []  # another slot only by evicting slot 0


def test_step_delta_ops_runs_kept_segments_on_merged_weights(monkeypatch):
    """StepDeltaOps.merged_linear with a MergedCache, its CUDA pieces replaced by CPU references (the expansion by
    W + the slot's dense Δ): a segment of admit_rows admits its slot (one build), the next step's shorter segment
    of that slot finds it (a hit) and a long one of another slot is admitted too; rows of other slots keep the base
    GEMM plus their deltas; a kept segment whose GEMM window spans other rows goes through scratch. Every row
    equals x @ (W + its Δ).T. A slot written again is not served its old weights."""
    from kernels import delta_linear
    from services.worker import linear_backend
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.engine import model_runner
    from tests.unit.worker.test_delta_ops import H, LIN, OUT, dense, make_slots

    gen = torch.Generator().manual_seed(4)
    slots, deltas = make_slots(gen)  # dense deltas in slots 0 and 2 (CPU)
    cache = slots.merged_cache = MergedCache(1 << 20, admit_rows=8, use_rows=4)
    monkeypatch.setattr(model_runner, "ROW_BUCKETS", True)
    monkeypatch.setattr(StepDeltaOps, "_merges_on", staticmethod(lambda x: True))
    monkeypatch.setattr(linear_backend, "merge_stack", lambda stack, x, w, rows: stack if rows is None else None)
    monkeypatch.setattr(delta_linear, "merged_weight",
                        lambda stack, slot, w: w + linear_backend._dense_slot(stack, slot, w.dtype))
    w = torch.randn(OUT, H, generator=gen)

    def check(segments):
        ops = StepDeltaOps(slots, segments)
        x = torch.randn(ops.num_rows, H, generator=gen)
        y = ops.merged_linear(LIN, x, w, None)
        if y is None:
            return None
        row = 0
        for slot, n in segments:
            w_i = w + deltas[slot][LIN + ".weight"] if slot is not None else w
            torch.testing.assert_close(y[row:row + n], x[row:row + n] @ w_i.T)
            row += n
        return ops

    ops = check([(None, 20), (0, 10), (2, 3)])  # 10 rows admit slot 0; its 16-row window ends at row 33: scratch
    assert ops.dense_route_used and cache.kept_slots() == [0] and (cache.builds, cache.hits) == (1, 0)
    check([(0, 5), (2, 9)])  # slot 0 kept: 5 >= use_rows; slot 2 admitted by 9 rows
    assert cache.kept_slots() == [0, 2] and (cache.builds, cache.hits) == (2, 1)
    assert check([(None, 4), (2, 3)]) is None  # 3 < use_rows: base GEMM + delta as usual
    new = {LIN + ".weight": torch.randn(OUT, H, generator=gen).half().float()}
    slots.write(0, "ft0b", {k: dense(k, v) for k, v in new.items()})
    deltas[0] = new
    assert check([(0, 5)]) is None  # written again: its kept weights are stale and 5 rows do not admit it
    check([(0, 8)])  # admitted anew, from the new delta
    assert cache.builds == 3 and cache.kept_slots() == [2, 0]


def test_worker_status_reports_the_cache_and_the_bench_reads_its_counters():
    """The worker's Status carries MergedCache.stats() as MergedCacheStats (unset with no cache), and bench/replay.py
    turns the first and last reads of a run into that run's hits, builds and evictions."""
    import asyncio
    from types import SimpleNamespace

    from bench.replay import merged_cache_deltas
    from deltazip.v1 import worker_pb2
    from services.worker.app import WorkerInfo, WorkerStatus
    from services.worker.engine_loop import EngineStats
    from services.worker.server import WorkerServicer

    cache = MergedCache(8 * MB, admit_rows=1)
    assert cache.reserve(0, 0, 2 * MB)
    cache.put(0, 0, "w", weight(2))
    cache.lookup(0, 0, "w")
    info = WorkerInfo("w1", "base", "id", "cuda:0", "delta", 128)

    def status(merged):
        app = SimpleNamespace(status=lambda: WorkerStatus(info, EngineStats(), [], {}, False, {}, merged))
        return asyncio.run(WorkerServicer(app, "127.0.0.1:1", 16).Status(worker_pb2.StatusRequest(), None))

    reply = status(cache.stats())
    assert reply.HasField("merged_cache")
    assert (reply.merged_cache.slots, reply.merged_cache.used_bytes, reply.merged_cache.budget_bytes) == (1, 2 * MB,
                                                                                                           8 * MB)
    assert (reply.merged_cache.hits, reply.merged_cache.builds, reply.merged_cache.evictions) == (1, 1, 0)
    assert not status(None).HasField("merged_cache")
    before = reply.merged_cache
    cache.lookup(0, 0, "w")
    assert cache.reserve(1, 0, 7 * MB)  # evicts slot 0
    cache.put(1, 0, "w", weight(7))
    after = status(cache.stats()).merged_cache
    assert merged_cache_deltas(before, after) == {"hits": 1, "builds": 1, "evictions": 1, "slots": 1,
                                                  "used_bytes": 7 * MB, "budget_bytes": 8 * MB}


def test_reserve_never_evicts_a_protected_slot():
    """Slots of the current step are protected: room is made from the others only, or refused."""
    cache = MergedCache(6 * MB, admit_rows=1)
    for slot in (0, 1):
        assert cache.reserve(slot, 0, 3 * MB)
        cache.put(slot, 0, "w", weight(3))
    assert not cache.reserve(2, 0, 3 * MB, protect=frozenset({0, 1, 2}))  # both others in this step: refused
    assert cache.kept_slots() == [0, 1] and cache.evictions == 0
    assert cache.reserve(2, 0, 3 * MB, protect=frozenset({1, 2}))  # slot 0 is not in this step: it goes
    assert cache.kept_slots() == [1]
