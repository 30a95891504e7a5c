"""Merging a serving matrix: per-job results (as bench/serve.py writes them) into one JSON, table, goals and PNG."""

import json

import pytest

from bench import merge_serving
from bench.replay import add_ratios

DATE = "2026-11-27"


def job_rows(num_models: int, bits: int, delta_rps: float, swap_rps: float | None) -> list[dict]:
    rows = []
    for load in (1.0, 2.0):
        rate = 10.0 * load
        rows.append({"mode": "base", "bits": None, "num_models": 0, "load": load, "rate_rps": rate,
                     "throughput_rps": rate})
        measured = {"delta": (delta_rps * load, 0.9, 1.5), "dense-delta": (4.0, 0.4, 9.0)}
        if swap_rps is not None and load == 1.0:  # swap's second load cut by the budget
            measured["swap"] = (swap_rps, 0.1, 30.0)
        for mode, (rps, slo, ttft_vs_base) in measured.items():
            rows.append({"mode": mode, "bits": bits, "num_models": num_models, "load": load, "rate_rps": rate,
                         "throughput_rps": rps, "slo_attainment": slo, "ttft_p90_vs_base": ttft_vs_base})
    add_ratios(rows)
    return rows


def write_job(jobs_dir, label: str, gpu: str, num_models: int, bits: int, rc, rows: list[dict] | None) -> None:
    record = {"label": label, "gpu": gpu, "num_models": num_models, "bits": bits, "budget_s": 180, "rc": rc,
              "log": f"{label}.log"}
    (jobs_dir / f"{label}.job.json").write_text(json.dumps(record))
    if rows is not None:
        result = {"bench": "serving", "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "date": DATE,
                  "config": {"num_models": [num_models], "bits": [bits], "label": label, "loads": [1.0, 2.0],
                             "timeout_s": 45.0}, "rows": rows, "goals": {}, "warmups": [], "skipped": [],
                  "over_budget": [{"mode": "swap", "load": 2.0, "why": "budget of 180 s spent"}], "timeline": []}
        (jobs_dir / f"serving-{label}-{DATE}.json").write_text(json.dumps(result))


@pytest.fixture
def jobs_dir(tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_job(jobs, "H100-m8-b4", "0", 8, 4, 0, job_rows(8, 4, delta_rps=9.0, swap_rps=3.0))
    write_job(jobs, "H100-m32-b4", "1", 32, 4, 124, job_rows(32, 4, delta_rps=9.5, swap_rps=0.5))
    write_job(jobs, "H100-m32-b2", "0", 32, 2, None, None)  # stopped by the runner before it wrote a point
    return jobs


def test_merge_writes_one_json_with_every_jobs_rows_and_gpu(jobs_dir, tmp_path, capsys):
    path = merge_serving.merge(jobs_dir, tmp_path / "out")
    assert path.name.startswith("serving-matrix-NVIDIA-H100-80GB-HBM3-")
    data = json.loads(path.read_text())
    assert data["bench"] == "serving" and data["kind"] == "matrix" and data["commit"] == "abc1234"
    assert data["config"] == {"loads": [1.0, 2.0], "timeout_s": 45.0,
                              "jobs": ["8x4bit@gpu0", "32x2bit@gpu0", "32x4bit@gpu1"]}
    status = {j["label"]: (j["gpu"], j["status"], j["result"]) for j in data["jobs"]}
    assert status == {"H100-m8-b4": ("0", "done", f"serving-H100-m8-b4-{DATE}.json"),
                      "H100-m32-b4": ("1", "hard-stopped at its time limit", f"serving-H100-m32-b4-{DATE}.json"),
                      "H100-m32-b2": ("0", "no end recorded (the runner itself was stopped)", None)}
    assert len(data["rows"]) == 2 * 7  # base, delta, dense-delta at 2 loads, swap at 1
    base = [r for r in data["rows"] if r["mode"] == "base" and r["job"] == "H100-m32-b4"]
    assert {(r["gpu"], r["job_num_models"], r["job_bits"]) for r in base} == {("1", 32, 4)}
    assert path.with_suffix(".png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "d/swap" in printed and "job H100-m32-b4 on gpu 1: hard-stopped at its time limit, 1 point(s)" in printed


def test_summary_has_ratios_and_slo_per_models_bits_load(jobs_dir, tmp_path):
    data = json.loads(merge_serving.merge(jobs_dir, tmp_path / "out").read_text())
    table = {(e["num_models"], e["bits"], e["load"]): e for e in data["summary"]}
    assert sorted(table) == [(8, 4, 1.0), (8, 4, 2.0), (32, 4, 1.0), (32, 4, 2.0)]
    m32 = table[(32, 4, 1.0)]
    assert m32["delta_vs_swap"] == pytest.approx(19.0) and m32["delta_vs_dense"] == pytest.approx(9.5 / 4.0)
    assert m32["base_rps"] == 10.0 and m32["swap_rps"] == 0.5 and m32["delta_ttft_p90_vs_base"] == 1.5
    assert (m32["slo_delta"], m32["slo_dense"], m32["slo_swap"]) == (0.9, 0.4, 0.1)
    assert m32["delta_slo_at_least_baselines"] is True and m32["gpu"] == "1"
    cut = table[(32, 4, 2.0)]
    assert cut["swap_rps"] is None and cut["delta_vs_swap"] is None and cut["slo_swap"] is None
    goals = data["goals"]
    assert goals["throughput_vs_swap_at_32"] == {"4bit-load1": pytest.approx(19.0)}
    assert goals["throughput_vs_swap_15x_at_32"] == {"4bit-load1": True}
    assert goals["ttft_p90_within_2x_base"] == {"met": 4, "measured": 4, "points": 4}
    assert goals["slo_at_least_both_baselines"] == {"met": 4, "measured": 4, "points": 4}


def test_table_text_marks_what_was_not_measured():
    entry = {"num_models": 8, "bits": 2, "load": 1.0, "rate_rps": 12.0, "base_rps": 12.0, "delta_rps": 11.0,
             "dense_rps": None, "swap_rps": None, "delta_vs_swap": None, "delta_vs_dense": None,
             "delta_ttft_p90_vs_base": 1.25, "slo_delta": 1.0, "slo_dense": None, "slo_swap": None, "gpu": "3"}
    lines = merge_serving.format_table([entry, {**entry, "host_cache_gib": 12.0}]).splitlines()
    assert lines[0].split()[:5] == ["models", "bits", "host", "load", "rate"]
    assert lines[1].split() == ["8", "2", "-", "1", "12.0", "12.00", "11.00", "-", "-", "-", "-", "1.25x", "1.00", "-",
                                "-", "3"]
    assert lines[2].split()[2] == "12G"


def test_no_job_records_is_an_error_that_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no job records"):
        merge_serving.merge(tmp_path, tmp_path / "out")


def _merged_one_job(tmp_path, name: str, label: str, num_models: int, delta_rps: float, device: str | None = None):
    """A merged matrix of one job, as one device call per job leaves it."""
    jobs = tmp_path / name
    jobs.mkdir()
    write_job(jobs, label, "0", num_models, 4, 0, job_rows(num_models, 4, delta_rps=delta_rps, swap_rps=1.0))
    if device:
        result = next(jobs.glob("serving-*.json"))
        result.write_text(json.dumps({**json.loads(result.read_text()), "device": device}))
    return merge_serving.merge(jobs, tmp_path / f"{name}-out", label=name)


def test_combine_puts_one_job_per_call_matrices_side_by_side(tmp_path):
    a = _merged_one_job(tmp_path, "a", "H100-m8-b4", 8, delta_rps=9.0)
    b = _merged_one_job(tmp_path, "b", "H100-m32-b4", 32, delta_rps=8.0)
    data = json.loads(merge_serving.combine([b, a], tmp_path / "out", label="both").read_text())
    assert [j["label"] for j in data["jobs"]] == ["H100-m8-b4", "H100-m32-b4"]
    assert data["config"]["jobs"] == ["8x4bit@gpu0", "32x4bit@gpu0"]
    assert data["config"]["combined_from"] == [b.name, a.name]
    assert len(data["rows"]) == 2 * 7 and data["commit"] == "abc1234"
    table = {(e["num_models"], e["load"]): e for e in data["summary"]}
    assert sorted(table) == [(8, 1.0), (8, 2.0), (32, 1.0), (32, 2.0)]
    assert table[(32, 1.0)]["delta_vs_swap"] == pytest.approx(8.0)
    assert data["goals"]["throughput_vs_swap_at_32"] == {"4bit-load1": pytest.approx(8.0)}
    assert data["goals"]["ttft_p90_within_2x_base"] == {"met": 4, "measured": 4, "points": 4}


def test_combine_refuses_a_job_twice_and_mixed_devices(tmp_path):
    a = _merged_one_job(tmp_path, "a", "H100-m8-b4", 8, delta_rps=9.0)
    again = _merged_one_job(tmp_path, "again", "H100-m8-b4", 8, delta_rps=7.0)
    with pytest.raises(SystemExit, match="H100-m8-b4 is in more than one file"):
        merge_serving.combine([a, again], tmp_path / "out")
    other = _merged_one_job(tmp_path, "other", "H200-m32-b4", 32, delta_rps=9.0, device="NVIDIA H200")
    with pytest.raises(SystemExit, match="different devices"):
        merge_serving.combine([a, other], tmp_path / "out")
