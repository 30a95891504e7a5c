"""Smoke test of the scale-out benchmark: its whole pipeline on CPU with a tiny model (plumbing, not speed).

redis + 2 delta stores + 2 schedulers as real processes, K = 1 then 2 CPU workers, the Zipf workload replayed
by 2 client processes split over the schedulers, then a burst on a cold model with prefetch on and off;
the JSON must be complete (every phase, no failed request) and its numbers sane, and the plot must render.
"""

import json
import math

import pytest

from bench import plot_scaleout, scaleout

pytestmark = pytest.mark.timeout(180)


def test_scaleout_bench_writes_complete_results(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = scaleout.main(["--device", "cpu", "--shape", "tiny", "--workers", "1,2", "--num-models", "3",
                          "--num-requests", "16", "--rate-rps", "100", "--passes", "warm", "--burst-size", "6",
                          "--burst-at-s", "0.2", "--burst-span-s", "0.5", "--burst-bg-requests", "4",
                          "--burst-bg-rate-rps", "8", "--work-dir", str(tmp_path / "work"), "--out",
                          str(tmp_path / "results"), "--logs-out", str(tmp_path / "results"), "--label", "cpu-smoke"])
    data = json.loads(path.read_text())
    assert path.name.startswith("scaleout-cpu-smoke-")
    assert {"bench", "device", "commit", "date", "config", "rows", "summary", "latencies"} <= set(data)
    assert data["bench"] == "scaleout" and data["device"] == "cpu"
    assert data["complete"] and not data["skipped"] and "error" not in data

    push, *runs = data["rows"]
    assert push["phase"] == "push" and push["num_deltas"] == 3 + 2 + 1 and push["num_stores"] == 2
    assert push["bytes"] == 2 * push["num_deltas"] * push["delta_bytes"] > 0
    scale = {r["num_workers"]: r for r in runs if r["phase"] == "scale"}
    bursts = {r["prefetch"]: r for r in runs if r["phase"] == "burst"}
    assert set(scale) == {1, 2} and set(bursts) == {"on", "off"}
    for r in runs:
        assert r["num_failed"] == 0, r["errors"]
        assert r["throughput_rps"] > 0 and math.isfinite(r["ttft_p90_ms"]) and r["ttft_p50_ms"] <= r["ttft_p90_ms"]
        assert len(r["cpu_scheduler"]) == 2 and len(r["cpu_store"]) == 2 and len(r["cpu_client"]) == 2
        assert r["store_bytes_served"] == r["worker_fetch_bytes"]  # what the stores sent is what the workers got
    assert scale[1]["scaling_vs_1"] == 1.0 and scale[2]["scaling_vs_1"] > 0
    assert len(scale[2]["workers"]) == 2 and scale[2]["worker_fetch_bytes"] > 0  # fresh workers fetch
    assert all(sum(r["store_bytes_served_per_store"]) > 0 for r in scale.values())
    assert scale[2]["store_bytes_served_per_store"][1] > 0  # worker 1 lists store 1 first: both stores serve
    for b in bursts.values():
        assert b["burst_size"] == 6 and b["model"] not in ("ft-000", "ft-001", "ft-002")
        assert sum(b["burst_tiers"].values()) == 6 and 0 <= b["warm_hit_fraction"] <= 1
        assert b["burst_tiers"].get("remote", 0) >= 1  # the model was cold: someone fetched it
    assert data["summary"]["warm"]["scaling_2_over_1"] == scale[2]["scaling_vs_1"]
    assert data["summary"]["burst_ttft_p90_off_over_on"] > 0
    assert (tmp_path / "results" / f"{path.stem}-logs.txt").stat().st_size > 1000
    png = plot_scaleout.plot(path)
    assert png.exists() and png.stat().st_size > 10_000
