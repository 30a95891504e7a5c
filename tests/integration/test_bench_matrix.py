"""The serving matrix runner (scripts/bench_gpu_matrix.sh): its plan for a 4-GPU host, and the whole pipeline on CPU
with two "GPUs" (plain process slots): two jobs side by side, each a whole stack, then one merged JSON + PNG."""

import json
import os
import re
import subprocess
import sys

import pytest

from deltazip.stack import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "bench_gpu_matrix.sh"


def run_script(env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PY": sys.executable, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


def test_plan_deals_jobs_round_robin_with_distinct_labels_and_ports():
    done = run_script({"DRY_RUN": "1", "GPU_NAME": "NVIDIA-H100-80GB-HBM3", "GPUS": "0,1,2,3"}, timeout_s=30)
    assert done.returncode == 0, done.stderr
    jobs = [dict(kv.split("=") for kv in line.split()[2:])
            for line in done.stdout.splitlines() if line.startswith("job ")]
    assert [(j["num_models"], j["bits"], j["gpu"], j["turn"]) for j in jobs] == [
        ("8", "4", "0", "1"), ("16", "4", "1", "1"), ("8", "2", "2", "1"), ("16", "2", "3", "1"),
        ("64", "2", "0", "2"), ("32", "2", "1", "2"), ("64", "4", "2", "2"), ("32", "4", "3", "2")]
    assert len({j["label"] for j in jobs}) == 8 and jobs[7]["label"] == "NVIDIA-H100-80GB-HBM3-m32-b4"
    ranges = sorted(tuple(map(int, j["ports"].split("-"))) for j in jobs)
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint
    assert "--warmup-prefetch" in done.stdout and "--keep-disk-cache" in done.stdout
    # a job with its own host cache: its own label, and the flag after the shared one (the last wins)
    host = run_script({"DRY_RUN": "1", "DEVICE": "cpu", "JOBS": "32:4,32:4:h12"}, timeout_s=30)
    labels = [line.split("label=")[1].split()[0] for line in host.stdout.splitlines() if line.startswith("job ")]
    assert host.returncode == 0 and labels == ["cpu-m32-b4", "cpu-m32-b4-h12"] and "host_gib=12" in host.stdout
    bad = run_script({"DRY_RUN": "1", "DEVICE": "cpu", "JOBS": "8"}, timeout_s=30)
    assert bad.returncode == 1 and "num_models:bits" in bad.stderr


@pytest.mark.timeout(240)
def test_two_jobs_side_by_side_on_cpu_merge_into_one_result(tmp_path):
    out = tmp_path / "out"
    # MODE_RESERVE_S: the tiny stack's worker starts in seconds; the default (50 s, sized for a 7B GPU stack) once
    # skipped swap in a clean-clone CI run with 49.x s of the 100 s left. BUDGET_S 160: jobs stop when done (~80 s
    # on 2 idle cores), so the budget only matters on a loaded machine, where 100 s once left no time for swap.
    env = {"DEVICE": "cpu", "NUM_FAKE_GPUS": "2", "SHAPE": "tiny", "JOBS": "2:4,3:2:h1", "MODES": "delta,swap",
           "LOADS": "1", "NUM_REQUESTS": "6", "RATE_RPS": "8", "PROMPT_LEN": "16", "OUTPUT_LEN": "4",
           "WARMUP_REQUESTS": "2", "BUDGET_S": "160", "MODE_RESERVE_S": "20", "HOST_CACHE_BYTES": str(2 << 30),
           "PORT_BASE": "25000", "OUT": str(out), "OMP_NUM_THREADS": "1",
           "BENCH_ARGS": "--worker-flag=--num-kv-blocks=64 --worker-flag=--kv-block-size=8"}
    done = run_script(env, timeout_s=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = next(out.glob("serving-matrix-cpu-*.json"))
    merged = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert {(j["label"], j["gpu"], j["status"]) for j in merged["jobs"]} == {("cpu-m2-b4", "0", "done"),
                                                                            ("cpu-m3-b2-h1", "1", "done")}
    assert {(r["job"], r["mode"]) for r in merged["rows"]} == {
        (job, mode) for job in ("cpu-m2-b4", "cpu-m3-b2-h1") for mode in ("base", "delta", "swap")}
    # the :h1 job's workers had a 1 GiB host cache, the other one the matrix default
    assert [e["host_cache_gib"] for e in merged["summary"]] == [2, 1]
    assert all(r["num_failed"] == 0 for r in merged["rows"])
    assert [(e["num_models"], e["bits"]) for e in merged["summary"]] == [(2, 4), (3, 2)]
    assert all(e["delta_vs_swap"] > 0 and e["delta_ttft_p90_vs_base"] > 0 for e in merged["summary"])
    warmed = {(j["label"], w["mode"]): w["prefetch"]["warmed_to"] for j in merged["jobs"] for w in j["warmups"]}
    assert warmed[("cpu-m3-b2-h1", "swap")] == ["host"] and warmed[("cpu-m2-b4", "delta")] == ["device", "host"]
    assert re.search(r"models\s+bits\s+host\s+load", done.stdout)
