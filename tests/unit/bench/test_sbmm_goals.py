"""bench/sbmm_goals.py counts the issue's goals right: on session 17's committed H100 run of the worker's launches
(counted there by hand too: sp4 30 of 32, sp2 24 of 32 at >= 0.70) and on hand-made rows at the thresholds."""

import json
from pathlib import Path

from bench.sbmm_goals import describe, goal_summary

RESULT = Path(__file__).resolve().parents[3] / "bench/results/sbmm-s17-worker-shapes-NVIDIA-H100-80GB-HBM3-2026-11-27.json"


def _row(shape, num, rows, bits, frac, bmm, base=2.0, layout="sp4"):
    return {"shape": shape, "num_deltas": num, "rows_per_delta": rows, "bits": bits, "layout": layout,
            "fraction_of_limit": frac, "fraction_of_limit_workspace": frac + 0.01, "speedup_vs_bmm": bmm,
            "base_plus_sbmm_over_base": base}


def test_counts_on_the_committed_worker_shapes_run():
    goals = goal_summary(json.loads(RESULT.read_text())["rows"])
    assert goals["sp4"]["points"] == goals["sp2"]["points"] == 32
    assert (goals["sp4"]["hbm_met"], goals["sp4"]["hbm_met_workspace"], goals["sp4"]["bmm_met"]) == (30, 31, 30)
    assert (goals["sp2"]["hbm_met"], goals["sp2"]["hbm_met_workspace"], goals["sp2"]["bmm_met"]) == (24, 26, 18)
    assert goals["sp4"]["hbm_misses"] == ["o 8x1 0.662", "o 8x4 0.615"]
    assert goals["sp4"]["base_plus_sbmm_met"] == 0 and len(goals["sp4"]["base_plus_sbmm_8x4"]) == 4


def test_thresholds_and_what_is_left_out():
    rows = [_row("a", 8, 4, 4, 0.70, 4.0, base=1.3), _row("a", 8, 1, 4, 0.6999, 3.99),
            _row("a", 4, 4, 4, 0.1, 1.0),  # N < 8: not a goal point
            _row("a", 8, 16, 4, 0.1, 1.0),  # 16 rows: not decode
            _row("a", 16, 1, 2, 0.9, 5.99, layout="sp2"), {"shape": "a", "num_deltas": 8}]  # a sweep row: skipped
    goals = goal_summary(rows)
    assert (goals["sp4"]["points"], goals["sp4"]["hbm_met"], goals["sp4"]["bmm_met"]) == (2, 1, 1)
    assert goals["sp4"]["base_plus_sbmm_met"] == 1 and goals["sp4"]["hbm_misses"] == ["a 8x1 0.700"]
    assert (goals["sp2"]["hbm_met"], goals["sp2"]["bmm_met"], goals["sp2"]["bmm_goal"]) == (1, 0, 6.0)
    assert "sp2 (2-bit)" in describe(goals)
