"""Scale-out benchmark pieces without processes: the burst workload, store throughput from sampled counters,
worker counter differences, scaling ratios and the default worker counts."""

import pytest

from bench.scaleout import device_slots, parse_args
from bench.scaleout_measure import StoreSampler, burst_workload, cpu_util, worker_stats
from bench.scaleout_phases import summarize_run
from bench.workload import WorkloadConfig


def test_burst_lands_on_the_cold_model_inside_its_window():
    background = WorkloadConfig(("ft-000", "ft-001"), num_requests=30, rate_rps=10.0, seed=3)
    reqs = burst_workload(background, "ft-cold", burst_size=12, burst_at_s=2.0, burst_span_s=1.0)
    burst = [r for r in reqs if r.id.startswith("burst-")]
    assert len(reqs) == 42 and len(burst) == 12 and len({r.id for r in reqs}) == 42
    assert {r.model for r in burst} == {"ft-cold"} and all(r.model != "ft-cold" for r in reqs if r not in burst)
    assert all(2.0 <= r.timestamp <= 2.0 + 3.0 for r in burst)  # Poisson over ~1 s: a generous bound
    assert [r.timestamp for r in reqs] == sorted(r.timestamp for r in reqs)


def sampler_with(samples: list[tuple[float, list[float]]]) -> StoreSampler:
    sampler = StoreSampler.__new__(StoreSampler)
    sampler.samples = samples
    return sampler


def test_store_throughput_mean_and_one_second_peak():
    # two stores; 100 MB served by store 0 in [1, 2] s, 20 MB by store 1 in [2, 3] s
    samples = [(0.0, [0, 0]), (0.5, [0, 0]), (1.0, [0, 0]), (1.5, [50e6, 0]), (2.0, [100e6, 0]), (2.5, [100e6, 10e6]),
               (3.0, [100e6, 20e6]), (4.0, [100e6, 20e6])]
    s = sampler_with(samples).summary()
    assert s["store_bytes_served"] == 120e6 and s["store_bytes_served_per_store"] == [100e6, 20e6]
    assert s["store_bytes_per_s_mean"] == pytest.approx(30e6)
    assert s["store_bytes_per_s_peak_1s"] == pytest.approx(100e6)
    assert len(s["store_series"]) == len(samples)


def test_worker_stats_are_differences_between_scrapes():
    def scrape(fetch_bytes, fetch_s, steps, seqs):
        return {("deltazip_delta_bytes_total", (("stage", "fetch"),)): fetch_bytes,
                ("deltazip_delta_seconds_sum", (("stage", "fetch"),)): fetch_s,
                ("deltazip_delta_seconds_count", (("stage", "fetch"),)): 2.0,
                ("deltazip_batch_sequences_count", ()): steps, ("deltazip_batch_sequences_sum", ()): seqs}

    stats = worker_stats([scrape(10, 1, 5, 5), {}], [scrape(410, 3, 15, 85), scrape(100, 1, 4, 4)])  # {}: new worker
    assert stats["worker_fetch_bytes"] == 500 and stats["worker_fetch_s"] == 3
    assert stats["worker_fetch_bytes_per_s"] == pytest.approx(500 / 3)
    assert stats["workers"][0]["batch_mean"] == pytest.approx(8.0) and stats["workers"][1]["num_fetches"] == 2.0
    assert worker_stats([{}], [{}])["worker_fetch_bytes_per_s"] is None  # a worker that did not answer
    loads = {("deltazip_delta_seconds_sum", (("stage", "host_load"),)): 0.5,
             ("deltazip_delta_seconds_count", (("stage", "host_load"),)): 2.0,
             ("deltazip_delta_seconds_sum", (("stage", "device_load"),)): 0.25,
             ("deltazip_batch_distinct_deltas_sum", ()): 30.0, **scrape(0, 0, 10, 40)}
    w = worker_stats([{}], [loads], wall_s=2.0)["workers"][0]
    assert (w["host_load_s"], w["num_host_loads"], w["device_load_s"]) == (0.5, 2.0, 0.25)
    assert w["deltas_per_step_mean"] == 3.0 and w["step_ms_mean"] == pytest.approx(200.0)


def test_cpu_util_per_role():
    util = cpu_util({"worker": [1.0, 2.0], "store": [0.5]}, {"worker": [3.0, 2.5], "store": [0.5]}, wall_s=2.0)
    assert util == {"cpu_worker": [1.0, 0.25], "cpu_store": [0.0]}


def row(phase, k=None, cache="warm", thr=0.0, **extra):
    return {"phase": phase, "num_workers": k, "pass": cache, "throughput_rps": thr, "saturated": True, **extra}


def test_summary_ratios_are_within_a_pass_and_burst_on_vs_off():
    rows = [row("push", bytes_per_s=5e8), row("scale", 1, "cold", 10.0), row("scale", 2, "cold", 19.0),
            row("scale", 1, "warm", 20.0), row("scale", 2, "warm", 30.0),
            row("burst", 2, prefetch="on", ttft_p90_ms=100.0), row("burst", 2, prefetch="off", ttft_p90_ms=300.0)]
    summary = summarize_run(rows)
    assert summary["cold"]["scaling_2_over_1"] == pytest.approx(1.9)
    assert summary["warm"]["scaling_2_over_1"] == pytest.approx(1.5)
    assert rows[2]["scaling_vs_1"] == pytest.approx(1.9) and rows[3]["scaling_vs_1"] == pytest.approx(1.0)
    assert summary["burst_ttft_p90_off_over_on"] == pytest.approx(3.0)
    assert summary["push_bytes_per_s"] == 5e8


def test_default_worker_counts_follow_the_gpus():
    assert parse_args(["--device", "cuda", "--num-gpus", "2"]).workers == [1, 2]
    assert parse_args(["--device", "cuda", "--num-gpus", "8"]).workers == [1, 2, 4, 8]
    assert parse_args(["--device", "cuda", "--num-gpus", "6"]).workers == [1, 2, 4, 6]
    assert parse_args([]).workers == [1, 2] and parse_args(["--workers", "4,1,2"]).workers == [1, 2, 4]
    with pytest.raises(SystemExit):
        parse_args(["--passes", "lukewarm"])


def test_resident_pass_runs_alone_and_seeds_worker_caches_with_links(tmp_path):
    from bench.scaleout_stack import seed_cache

    assert parse_args(["--passes", "resident"]).resident_tier == "device"
    assert device_slots(["--max-num-seqs", "8", "--num-device-slots", "16", "--num-device-slots=64"]) == 64
    assert device_slots([]) == 4  # the worker's default
    for bad in ("resident,warm", "cold,resident"):
        with pytest.raises(SystemExit):
            parse_args(["--passes", bad])
    art = tmp_path / "models" / "ft-000"
    (art / "files").mkdir(parents=True)
    (art / "manifest.json").write_text("{}")
    (art / "files" / "finetune.json").write_text("[]")
    seed_cache(tmp_path / "cache", {"ft-000": art})
    copied = tmp_path / "cache" / "ft-000"
    assert (copied / "manifest.json").read_text() == "{}" and (copied / "files" / "finetune.json").is_file()
    assert (copied / "manifest.json").stat().st_ino == (art / "manifest.json").stat().st_ino  # a link, no copy


def test_requests_per_worker_is_off_by_default():
    assert parse_args([]).requests_per_worker is False
    assert parse_args(["--requests-per-worker"]).requests_per_worker is True
