"""bench/worker.py --tiny runs end to end on CPU and writes the DESIGN.md row names (numbers meaningless)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_worker", ROOT / "bench" / "worker.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_worker_tiny_writes_rows(tmp_path):
    torch.set_num_threads(1)
    bench = _load_bench()
    assert bench.main(["--tiny", "--out", str(tmp_path), "--commit", "test"]) == 0
    (path,) = tmp_path.glob("worker-*-tiny.json")
    result = json.loads(path.read_text())
    assert result["bench"] == "worker" and result["commit"] == "test"
    by_part = {}
    for row in result["rows"]:
        by_part.setdefault(row["part"], []).append(row)
    assert [r["bits"] for r in by_part["load"]] == [2, 4] and all(0 < r["h2d_fraction"] for r in by_part["load"])
    assert {r["num_deltas"] for r in by_part["step"]} == {0, 1, 8, 32} and all(r["step_vs_base"] > 0
                                                                               for r in by_part["step"])
    for r in by_part["step"]:  # delta rows say whether one step or all of them set the mean
        if r["num_deltas"]:
            assert 0 < r["median_step_us"] <= r["max_step_us"] and r["num_steps_over_2x_median"] >= 0
            assert 0 <= r["slowest_step_index"] < 20 and r["sbmm_compiles_in_timed_steps"] == 0  # warmed untimed
            assert r["sbmm_warmup_s_in_timed_steps"] == 0.0
    assert {r["mode"] for r in by_part["modes"]} == {"swap", "dense-delta", "delta"}
    assert all("throughput_vs_swap" in r for r in by_part["modes"])


def test_bench_worker_prefill_with_deltas_writes_rows(tmp_path):
    """part=prefill-deltas: the base row first (the baseline), then 1 and 4 resident deltas, each over the same
    number of fresh-shape prefill steps."""
    torch.set_num_threads(1)
    bench = _load_bench()
    assert bench.main(["--tiny", "--parts", "prefill-deltas", "--out", str(tmp_path), "--commit", "test"]) == 0
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["num_deltas"] for r in rows] == [0, 1, 4] and rows[0]["vs_base"] == 1.0
    assert all(r["part"] == "prefill-deltas" and r["prefill_steps"] == 2 and r["ms"] > 0 for r in rows)


def test_bench_worker_long_prefill_ab_writes_both_arms_and_restores_the_route(tmp_path):
    """part=long-prefill-ab: per round and prompt length one row with the dense route and one without, each
    against the base prefill of the same length; the route's threshold function is put back afterwards."""
    from kernels import sbmm

    torch.set_num_threads(1)
    bench = _load_bench()
    before = sbmm.dense_rows
    assert bench.main(["--tiny", "--parts", "long-prefill-ab", "--out", str(tmp_path), "--commit", "test"]) == 0
    assert sbmm.dense_rows is before
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["round"], r["prompt_tokens"]) for r in rows] == [(0, 16), (0, 16), (0, 32), (0, 32), (1, 16), (1, 16),
                                                                  (1, 32), (1, 32)]
    assert [r["dense_route"] for r in rows[:2]] == [True, False] and [r["dense_route"] for r in rows[4:6]] == [False,
                                                                                                             True]
    assert all(r["part"] == "long-prefill-ab" and r["ms"] > 0 and r["base_ms"] > 0 for r in rows)


@pytest.mark.parametrize("left", [False, True])
def test_bench_worker_sp2_prefill_ab_times_every_arm_and_puts_the_flags_back(tmp_path, left):
    """part sp2-prefill-ab (tiny, CPU): the arms (on, off, and with --sp2-prefill-left-rows "left") per round, in
    reversed order every other round, the base for scale, and delta_linear's SP2_PREFILL_ROWS and
    SP2_PREFILL_LEFT_ROWS back at their earlier values."""
    from kernels import delta_linear

    torch.set_num_threads(1)
    bench = _load_bench()
    before = delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS
    extra = ["--sp2-prefill-left-rows", "32"] if left else []
    assert bench.main(["--tiny", "--parts", "sp2-prefill-ab", "--out", str(tmp_path), "--commit", "test",
                       *extra]) == 0
    assert (delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS) == before
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    arms = ["on", "off", "left"] if left else ["on", "off"]
    assert [(r["round"], r["arm"]) for r in rows] == [(0, a) for a in arms] + [(1, a) for a in arms[::-1]]
    assert [r["left_rows"] for r in rows if r["arm"] == "left"] == ([32, 32] if left else [])
    assert all(r["part"] == "sp2-prefill-ab" and r["ms"] > 0 and r["base_ms"] > 0 for r in rows)


def test_decode_steps_are_timed_only_after_the_sliced_warm_up_finished():
    """The runner warms SBMM variants up in slices inside its steps until done; the worker's idle loop finishes
    it, and so must the bench before its timed steps (a new engine per row is a new runner). An engine whose
    warm-up takes 10 slices, 4 of them run by the untimed steps: the other 6 run before the first timed step."""
    from services.worker.engine.step_profile import StepProfile

    bench = _load_bench()

    class SlicedWarmUpEngine:
        def __init__(self):
            self.profile, self.slices_left, self.log = StepProfile(), 10, []

        def add_request(self, *args, **kwargs):
            pass

        def abort(self, request_id):
            pass

        def warm_up(self):
            self.log.append("warm_up")
            if not self.slices_left:
                return False
            self.slices_left -= 1
            self.profile.add("warmup", 0.2)
            return True

        def step(self):
            # a step runs the rest of the warm-up itself when it is not finished (model_runner.run)
            if self.slices_left:
                self.slices_left -= 1
                self.profile.add("warmup", 0.2)
            self.log.append("step")

    engine, per_step, warmup_s = SlicedWarmUpEngine(), [], []
    bench.time_decode_steps(engine, 2, 1, "cpu", 4, 5, per_step, [], warmup_s)
    assert engine.log == ["step"] * 4 + ["warm_up"] * 7 + ["step"] * 5  # prefill, 3 decodes, warm-up, timed
    assert len(per_step) == 5 and warmup_s == [0.0]


def test_sbmm_configs_flag_swaps_the_table_that_launches_read(tmp_path):
    """--sbmm-configs (the in-run baseline of a table change) must reach kernels/sbmm_plan.py, where pick_config
    reads the tables: setting the name on kernels/sbmm.py (a re-export) would silently time the current table."""
    from kernels import sbmm, sbmm_plan

    bench = _load_bench()
    table = json.loads(sbmm_plan.CONFIG_FILE.read_text())
    table["default"]["triton"] = [{"max_rows": None, "BLOCK_M": 64, "BLOCK_N": 16, "marker": 1}]
    other = tmp_path / "older-table.json"
    other.write_text(json.dumps(table))
    original = sbmm_plan.CONFIG_FILE
    try:
        assert bench.main(["--tiny", "--parts", "load", "--out", str(tmp_path), "--commit", "test",
                           "--sbmm-configs", str(other)]) == 0
        assert sbmm.pick_config("triton", "cpu", 4)["marker"] == 1
    finally:
        sbmm_plan.CONFIG_FILE = original
        sbmm_plan._configs.cache_clear()
    assert "marker" not in sbmm.pick_config("triton", "cpu", 4)


def test_bench_worker_step_profile_writes_rows_and_tables(tmp_path):
    """part=step-profile: one row per delta count with the median wall time of a decode step and its kernel time
    under the profiler (0 on CPU: no kernels), a table file per row."""
    torch.set_num_threads(1)
    bench = _load_bench()
    assert bench.main(["--tiny", "--parts", "step-profile", "--out", str(tmp_path), "--commit", "test",
                       "--profile-dir", str(tmp_path / "prof")]) == 0
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["num_deltas"] for r in rows] == [0, 2] and all(r["wall_ms"] > 0 and r["device_ms"] >= 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["step-profile-2bit-d0-L2-s4.txt",
                                                                      "step-profile-2bit-d2-L2-s4.txt"]


def test_bench_worker_flag_parts_time_both_arms_and_put_the_flags_back(tmp_path):
    """parts decode-attn-ab and rope-kv-ab: both arms in each round, and each flag back at its own earlier value
    (the decode kernel's on, the fused rotation's off)."""
    from deltazip.model import attention, layers

    torch.set_num_threads(1)
    bench = _load_bench()
    before = attention.DECODE_KERNEL, layers.FUSED_ROPE_KV
    assert bench.main(["--tiny", "--parts", "decode-attn-ab,rope-kv-ab", "--out", str(tmp_path),
                       "--commit", "test"]) == 0
    assert (attention.DECODE_KERNEL, layers.FUSED_ROPE_KV) == before
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    for part, flag in (("decode-attn-ab", "DECODE_KERNEL"), ("rope-kv-ab", "FUSED_ROPE_KV")):
        mine = [r for r in rows if r["part"] == part]
        assert {(r["round"], r["on"], r["phase"]) for r in mine} == {(r, on, phase) for r in (0, 1)
                                                                     for on in (True, False)
                                                                     for phase in ("decode", "prefill")}
        assert all(r["flag"] == flag for r in mine)


def test_bench_worker_prefill_route_ab_times_every_arm_and_puts_the_routing_back(tmp_path):
    """part prefill-route-ab (tiny, CPU): one row per arm and round, reversed every other round, each arm's routing
    in force while it runs (its row says so), the base model's steps of its round for scale, and
    kernels/delta_linear.py's and sbmm_plan.py's routing attributes back afterwards; an unknown key is refused."""
    from kernels import delta_linear, sbmm_plan

    torch.set_num_threads(1)
    bench = _load_bench()
    before = (delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS, delta_linear.SP2_BLOCK_FILL,
              sbmm_plan.DENSE_ROWS_OVERRIDE)
    from services.worker import delta_ops

    join_before = delta_ops.BASE_JOIN_ROWS
    assert bench.main(["--tiny", "--parts", "prefill-route-ab", "--route-arms",
                       "default;dense=16,rows=8,left=4,fill=0.5,join=0", "--out", str(tmp_path),
                       "--commit", "test"]) == 0
    assert (delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS, delta_linear.SP2_BLOCK_FILL,
            sbmm_plan.DENSE_ROWS_OVERRIDE) == before and delta_ops.BASE_JOIN_ROWS == join_before
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    arm = "dense=16,rows=8,left=4,fill=0.5,join=0"
    assert [(r["round"], r["arm"]) for r in rows] == [(0, "default"), (0, arm), (1, arm), (1, "default")]
    assert {k: v for k, v in rows[1]["route"].items() if k not in ("DENSE_CHUNK_BYTES", "MERGED_ROW_BUCKETS")} == {
        "SP2_PREFILL_ROWS": 8, "SP2_PREFILL_LEFT_ROWS": 4, "SP2_BLOCK_FILL": 0.5, "DENSE_ROWS_OVERRIDE": 16,
        "BASE_JOIN_ROWS": 0}
    assert rows[0]["route"]["BASE_JOIN_ROWS"] == join_before
    assert rows[0]["route"]["DENSE_ROWS_OVERRIDE"] == before[3]
    assert all(r["part"] == "prefill-route-ab" and r["ms"] > 0 and r["base_ms"] > 0 and r["prefill_steps"] == 2
               for r in rows)
    assert len({r["base_ms"] for r in rows if r["round"] == 0}) == 1
    with pytest.raises(ValueError, match="unknown key 'dens'"):
        bench.route_arm("dens=16")
    assert bench.route_arm("chunk=64,window=0,rows=0") == {"DENSE_CHUNK_BYTES": 64 << 20, "MERGED_ROW_BUCKETS": False,
                                                           "SP2_PREFILL_ROWS": None}
    assert bench.route_arm("cache=0.5,admit=128") == {"merged_cache_gib": 0.5, "merged_cache_admit_rows": 128}


def test_bench_worker_prefill_route_ab_fresh_shapes_gives_every_arm_its_own_steps(tmp_path):
    """--fresh-shapes: each (round, arm) its own seed, and its base_ms the base model's steps of that seed."""
    torch.set_num_threads(1)
    bench = _load_bench()
    arm = "window=0,cache=0.001,admit=8"
    assert bench.main(["--tiny", "--parts", "prefill-route-ab", "--route-arms", f"default;{arm}", "--fresh-shapes",
                       "--out", str(tmp_path), "--commit", "test"]) == 0
    (path,) = tmp_path.glob("worker-*-tiny.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["round"], r["arm"], r["seed"]) for r in rows] == [(0, "default", 1000), (0, arm, 1001),
                                                                 (1, arm, 1003), (1, "default", 1002)]
    assert rows[1]["route"]["MERGED_ROW_BUCKETS"] is False and rows[0]["route"]["MERGED_ROW_BUCKETS"] is True
    # the cache arm's row carries its cache's counters (on CPU nothing merges: no builds), the default's none
    assert rows[0]["merged_cache"] is None and rows[1]["merged_cache"]["budget_bytes"] == int(0.001 * (1 << 30))
