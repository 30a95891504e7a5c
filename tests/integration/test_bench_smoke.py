"""Smoke test of the serving benchmark: the whole pipeline on CPU with a tiny model (asserts plumbing, not speed).

Synthetic tiny base + 2 packed 4-bit 2:4 deltas, redis + store + scheduler + one `delta` worker as real processes,
20 bursty requests replayed open-loop twice (base-only reference, then the fine-tunes), JSON and PNG written.
"""

import json
import math

import pytest

from bench import plot_serving, serve
from services.delta_store.storage import FILES_INDEX

pytestmark = pytest.mark.timeout(180)

MEASURED = ("throughput_rps", "tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "e2e_p99_ms", "tpot_p50_ms")


def test_serving_bench_writes_complete_results(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = serve.main(["--shape", "tiny", "--num-models", "2", "--modes", "delta", "--num-requests", "20",
                       "--rate-rps", "8", "--output-len", "6", "--prompt-len", "16", "--work-dir", str(tmp_path / "work"),
                       "--out", str(tmp_path / "results"), "--label", "cpu-smoke-test",
                       "--worker-flag=--num-kv-blocks=128", "--worker-flag=--kv-block-size=8"])
    data = json.loads(path.read_text())
    assert path.name.startswith("serving-cpu-smoke-test-")
    assert {"bench", "device", "commit", "date", "config", "rows", "latencies"} <= set(data)
    assert data["bench"] == "serving" and data["device"] == "cpu"
    assert data["host"]["cores"] >= data["host"]["cores_usable"] >= 1 and data["host"]["cpu"]  # hosts differ
    by_mode = {r["mode"]: r for r in data["rows"]}
    assert set(by_mode) == {"base", "delta"}
    for row in by_mode.values():
        assert row["num_requests"] == 20 and row["num_failed"] == 0, row["errors"]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in MEASURED), row
        assert row["ttft_p50_ms"] <= row["ttft_p90_ms"] <= row["e2e_p99_ms"]
    delta = by_mode["delta"]
    assert delta["num_models"] == 2 and delta["bits"] == 4
    assert 0.0 <= delta["slo_attainment"] <= 1.0 and delta["ttft_p90_vs_base"] > 0
    assert delta["throughput_vs_swap"] is None and delta["throughput_vs_dense"] is None  # baselines not run here
    assert all(len(entry["e2e_ms"]) == 20 for entry in data["latencies"])
    png = plot_serving.plot(path)
    assert png.exists() and png.stat().st_size > 10_000


def test_serving_bench_runs_a_mode_variant_with_its_own_worker_flags(tmp_path, monkeypatch):
    """--modes delta,delta+one,delta+bad: each a worker of mode delta in one job against one base reference; the
    variant's own --mode-flag reaches only its worker (delta+bad's invalid flag stops that worker alone, skipped
    with the worker's reason), and its rows carry its name and the ratios to the base."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = serve.main(["--shape", "tiny", "--num-models", "2", "--modes", "delta,delta+one,delta+bad",
                       "--num-requests", "12", "--rate-rps", "8", "--output-len", "4", "--prompt-len", "16",
                       "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "results"),
                       "--label", "cpu-variant-test", "--warmup-requests", "2",
                       "--mode-flag=delta+one=--max-deltas-per-batch=1", "--mode-flag=delta+bad=--kv-memory-fraction=2",
                       "--worker-flag=--num-kv-blocks=128", "--worker-flag=--kv-block-size=8"])
    data = json.loads(path.read_text())
    by_mode = {r["mode"]: r for r in data["rows"]}
    assert set(by_mode) == {"base", "delta", "delta+one"}
    for mode in ("delta", "delta+one"):
        row = by_mode[mode]
        assert row["num_requests"] == 12 and row["num_failed"] == 0, row["errors"]
        assert row["num_models"] == 2 and row["ttft_p90_vs_base"] > 0
    (skipped,) = data["skipped"]
    assert skipped["mode"] == "delta+bad" and "kv_memory_fraction" in skipped["why"]
    assert plot_serving.plot(path).exists()


def test_serving_bench_spreads_clients_over_several_schedulers(tmp_path, monkeypatch):
    """--schedulers 2 --client-procs 2: two scheduler processes, two client processes, one merged open-loop run."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = serve.main(["--shape", "tiny", "--num-models", "2", "--modes", "delta", "--num-requests", "12",
                       "--rate-rps", "0", "--output-len", "6", "--prompt-len", "16", "--work-dir", str(tmp_path / "work"),
                       "--out", str(tmp_path / "results"), "--label", "cpu-split-test", "--schedulers", "2",
                       "--client-procs", "2", "--stream-chunk-tokens", "4", "--warmup-requests", "4",
                       "--worker-flag=--num-kv-blocks=128", "--worker-flag=--kv-block-size=8"])
    data = json.loads(path.read_text())
    assert {r["mode"] for r in data["rows"]} == {"base", "delta"}
    # the worker's kernel totals after the warm-up: a CPU worker compiles nothing ahead and nothing in its steps,
    # so the wait for its warm-up to settle ends after the quiet period, with no slice run meanwhile
    none = {"count": 0, "seconds": 0.0}
    for key in ("settle_before", "settle"):  # before and after the warm-up requests
        settle = data["warmups"][0].pop(key)
        assert settle["settled"] and settle["slices"] == 0 and settle["waited_s"] < 5
    assert data["warmups"] == [{"mode": "delta", "bits": 4, "num_models": 2, "requests": 4, "completed": 4,
                                "worker_kernels": {"warmup": none, "compile": none}}]
    # --rate-rps 0: two calibration bursts (the first warms the worker), the last one sets load 1's rate
    cal = data["calibration"]
    assert len(cal["bursts_rps"]) == 2 and cal["completed"] == 12
    assert cal["rate_rps"] == pytest.approx(0.5 * cal["bursts_rps"][-1], rel=1e-2)
    for row in data["rows"]:
        assert row["num_requests"] == 12 and row["num_failed"] == 0, row["errors"]
        assert len(row["client_cpu_s"]) == 2 and math.isfinite(row["worker_running_mean"])
        # the worker's own profile of the point: 12 requests of 16-token prompts and 6 tokens each were prefilled
        # and decoded (eager on CPU); the busy phases fit inside the point's wall time (idle waits straddling the
        # interval's edges may be counted whole)
        phases = row["worker_phases"]
        assert phases["prefill"]["count"] >= 1 and phases["decode_eager"]["count"] >= 5, phases
        busy = sum(p["share"] for name, p in phases.items() if name != "idle")
        assert "decode_graph" not in phases and 0.0 < busy <= 1.0, phases
        # its delta rows as segments: none for the base's point; the delta point's 12 prompts each sat in a
        # prefill step's segment, and their 5 fed-back tokens each in some step's (bins: powers of two)
        segments = row["worker_delta_segments"]
        if row["mode"] == "base":
            assert segments == {}
        else:
            assert set(segments) <= {"prefill", "decode"} and segments["prefill"], segments
            rows = sum(r for bins in segments.values() for _, r in bins.values())
            assert rows >= 12 * (1 + 5), segments
            assert all(int(low) & (int(low) - 1) == 0 for bins in segments.values() for low in bins)


def test_serving_bench_prefetches_each_mode_to_its_strongest_tier(tmp_path, monkeypatch):
    """--warmup-prefetch with no warm-up requests: delta fills its 2 GPU slots with the 2 most popular fine-tunes
    and the host cache with the third; swap's host cache holds one merged model, the other two did not fit and
    sit on the disk cache the workers share (--keep-disk-cache), which --link-worker-cache filled with hard links to
    the store's files as each delta was pushed (written 2 at a time, local copies dropped). Ports come from
    --port-range."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "work"
    path = serve.main(["--shape", "tiny", "--num-models", "3", "--modes", "delta,swap", "--num-requests", "8",
                       "--rate-rps", "8", "--output-len", "4", "--prompt-len", "16", "--work-dir", str(work),
                       "--out", str(tmp_path / "results"), "--label", "cpu-prefetch-test", "--warmup-prefetch",
                       "--keep-disk-cache", "--link-worker-cache", "--write-jobs", "2", "--drop-local-copies",
                       "--port-range", "24100-24199", "--worker-flag=--num-kv-blocks=128",
                       "--worker-flag=--kv-block-size=8", "--worker-flag=--max-deltas-per-batch=1",
                       "--mode-flag", "delta=--num-device-slots=2", "--mode-flag", "swap=--num-device-slots=1",
                       "--mode-flag", "swap=--host-cache-bytes=400000"])
    data = json.loads(path.read_text())
    assert data["warm_tiers"] == {"delta": ["device", "host"], "dense-delta": ["device", "host"], "swap": ["host"]}
    warm = {w["mode"]: w for w in data["warmups"]}
    assert set(warm) == {"delta", "swap"} and all("requests" not in w for w in warm.values())
    delta, swap = warm["delta"]["prefetch"], warm["swap"]["prefetch"]
    assert delta["warmed_to"] == ["device", "host"] and delta["planned"] == {"device": 2, "host": 1}
    assert delta["resident"] == {"device": 2, "host": 1, "disk": 0, "remote": 0}
    assert delta["prefetched"] == 3 and not delta["failed"] and not delta["did_not_fit"]
    assert swap["warmed_to"] == ["host"] and swap["planned"] == {"host": 1} and swap["prefetched"] == 1
    assert swap["did_not_fit"] == ["ft-001-4b", "ft-002-4b"] and swap["model_host_bytes"] > 0
    assert swap["resident"] == {"device": 0, "host": 1, "disk": 2, "remote": 0}
    assert all(w["prefetch"]["seconds"] >= 0 and not w["prefetch"]["not_in_planned_tier"] for w in warm.values())
    assert {r["mode"] for r in data["rows"]} == {"base", "delta", "swap"}
    assert all(r["num_failed"] == 0 for r in data["rows"])
    assert [e["event"] for e in data["timeline"]][:2] == ["stack started", "deltas pushed"]
    ports = [int(log.stem.rsplit("-", 1)[1]) for log in (work / "logs").glob("*.log")]
    assert len(ports) >= 4 and all(24100 <= p <= 24199 for p in ports)  # store, scheduler, 2 workers
    # one copy on disk: every cached file is the store's own file (same inode), without the store's index
    store, cache = work / "store", work / "worker-cache-kept"
    for name in ("ft-000-4b", "ft-001-4b", "ft-002-4b"):
        cached = sorted(f.relative_to(cache / name) for f in (cache / name).rglob("*") if f.is_file())
        stored = sorted(f.relative_to(store / name) for f in (store / name).rglob("*")
                        if f.is_file() and f.name != FILES_INDEX)
        assert cached and cached == stored, name
        assert all((cache / name / f).stat().st_ino == (store / name / f).stat().st_ino for f in cached)
    assert not list((work / "models").glob("ft-*"))  # local copies dropped once pushed


def test_sched_cost_measures_each_flush_interval(tmp_path):
    """bench/sched_cost.py end to end, small: two flush intervals, prefetch on and off."""
    from bench import sched_cost

    path = sched_cost.main(["--num-models", "3", "--num-workers", "1", "--num-requests", "12", "--output-len", "8",
                            "--step-ms", "5", "--repeats", "1", "--flush-ms", "5,20", "--out", str(tmp_path),
                            "--label", "smoke"])
    result = json.loads(path.read_text())
    assert len(result["rows"]) == 4 and all(r["num_failed"] == 0 for r in result["rows"])
    # a 5 ms flush at a 5 ms step sends a chunk per token; 20 ms sends 4 tokens per chunk (after the first alone)
    by_flush = {r["variant"].rsplit("-", 1)[1]: r["tokens_per_chunk"] for r in result["rows"]}
    assert by_flush["flush5ms"] == 1.0 and by_flush["flush20ms"] > 2.0
    assert all(r["scheduler_cpu_ms_per_request"] > 0 and r["redis_commands_per_request"] > 5 for r in result["rows"])
