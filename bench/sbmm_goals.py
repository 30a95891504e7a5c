"""Issue 4's goals over a bench/sbmm.py result, per word layout (bench/sbmm.py stores it in its JSON as `goals`).

- N >= 8 distinct deltas at decode (1-4 rows per delta): >= 0.70 of the measured HBM copy limit, for a call on its
  own (`us`) and as the worker makes it (`us_workspace`);
- the same points >= 4x (4-bit) / >= 6x (2-bit) faster than torch.bmm over gathered dense deltas;
- base GEMM + SBMM over 8 deltas x 4 rows <= 1.3x the base GEMM alone.

  python bench/sbmm_goals.py bench/results/sbmm-<...>.json [...]   # prints each file's summary
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HBM_FRACTION = 0.70
BMM_SPEEDUP = {4: 4.0, 2: 6.0}  # by code width
BASE_PLUS_SBMM = 1.3


def goal_summary(rows: list[dict]) -> dict:
    """{layout: counts and misses} over a full run's rows (sweep rows carry no bmm baseline and are skipped)."""
    out: dict[str, dict] = {}
    for row in rows:
        if "speedup_vs_bmm" not in row:
            continue
        s = out.setdefault(row.get("layout", "canonical"), {
            "bits": row["bits"], "points": 0, "hbm_met": 0, "hbm_met_workspace": 0, "bmm_met": 0,
            "bmm_goal": BMM_SPEEDUP[row["bits"]], "hbm_misses": [], "base_plus_sbmm_8x4": {}})
        if row["num_deltas"] == 8 and row["rows_per_delta"] == 4:
            s["base_plus_sbmm_8x4"][row["shape"]] = round(row["base_plus_sbmm_over_base"], 3)
        if row["num_deltas"] < 8 or row["rows_per_delta"] not in (1, 2, 3, 4):
            continue
        s["points"] += 1
        s["hbm_met"] += row["fraction_of_limit"] >= HBM_FRACTION
        s["hbm_met_workspace"] += row.get("fraction_of_limit_workspace", row["fraction_of_limit"]) >= HBM_FRACTION
        s["bmm_met"] += row["speedup_vs_bmm"] >= BMM_SPEEDUP[row["bits"]]
        if row["fraction_of_limit"] < HBM_FRACTION:
            s["hbm_misses"].append(f"{row['shape']} {row['num_deltas']}x{row['rows_per_delta']} "
                                   f"{row['fraction_of_limit']:.3f}")
    for s in out.values():
        s["base_plus_sbmm_met"] = sum(v <= BASE_PLUS_SBMM for v in s["base_plus_sbmm_8x4"].values())
    return out


def describe(summary: dict) -> str:
    """One line per layout."""
    lines = []
    for lay, s in summary.items():
        lines.append(f"{lay} ({s['bits']}-bit): >= {HBM_FRACTION} of the limit at {s['hbm_met']} of {s['points']} "
                     f"N >= 8 decode points ({s['hbm_met_workspace']} as the worker calls), >= {s['bmm_goal']:g}x bmm "
                     f"at {s['bmm_met']}; base + SBMM (8 x 4) <= {BASE_PLUS_SBMM}x at {s['base_plus_sbmm_met']} of "
                     f"{len(s['base_plus_sbmm_8x4'])} shapes; misses: {', '.join(s['hbm_misses']) or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}:\n{describe(goal_summary(json.loads(Path(name).read_text())['rows']))}")
