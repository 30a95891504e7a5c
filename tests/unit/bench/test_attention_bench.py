"""bench/attention.py's points on the CPU (interpreter, tiny heads, a wall-clock timer for the graph timer): the
pipeline and the row fields, not the timings."""

import time

import pytest
import torch

from bench import attention as bench_attention
from kernels.sbmm_plan import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the kernels under TRITON_INTERPRET=1")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench_attention, "DEVICE", "cpu")
    monkeypatch.setattr(bench_attention, "DTYPE", torch.float32)
    monkeypatch.setattr(bench_attention, "LAYERS", 2)
    monkeypatch.setattr(bench_attention, "HEADS", 2)
    monkeypatch.setattr(bench_attention, "KV_HEADS", 2)
    monkeypatch.setattr(bench_attention, "DIM", 16)

    def wall_us(calls, replays=1):
        start = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - start) * 1e6 / len(calls)

    monkeypatch.setattr(bench_attention, "graph_us", wall_us)


def test_decode_point_times_every_config_and_the_gather_path(tiny):
    row = bench_attention.one_point(3, 40, 1000.0, bench_attention.CONFIGS[:2])
    assert len(row["configs"]) == 2 and all(c["us"] > 0 for c in row["configs"])
    assert row["gather_sdpa_us"] > 0 and row["speedup"] > 0
    assert row["bytes"] == 3 * 40 * 2 * 2 * 16 * 4 + 2 * 3 * 2 * 16 * 4  # K and V of every context, q and out


def test_mixed_point_times_the_varlen_kernel_and_the_gather_path(tiny):
    flags = bench_attention.attention.DECODE_KERNEL, bench_attention.attention.PREFILL_KERNEL
    row = bench_attention.mixed_point(2, 1, 20, 1000.0)
    assert row["kernel_us"] > 0 and row["gather_sdpa_us"] > 0 and row["tflops"] > 0
    assert row["bytes"] == (2 * 192 + 20) * 2 * 2 * 16 * 4 + 2 * (2 + 20) * 2 * 16 * 4
    assert (bench_attention.attention.DECODE_KERNEL, bench_attention.attention.PREFILL_KERNEL) == flags  # put back
