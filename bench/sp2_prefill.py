"""Prefill-sized 2-bit segments: kernels that expand each Δ tile once per row block (kernels/sp2_prefill.py, Triton;
kernels/sp2_wgmma.py, Hopper) against the SBMM launch the worker makes today, and the base GEMM of the same rows, in
the same run (GPU).

  python bench/sp2_prefill.py --out bench/results [--rows 64,128,256,512] [--label x]

Per worker launch shape (fused q/k/v, o, fused gate/up, down; Llama-2-7B), rows per segment and segment count
(1 or 4 deltas on sp2 words, group 128, fp16): `us_sbmm` (the tuned SBMM config, kernels/sbmm.py), `us_prefill`
per kernel config (`configs`: kernels/sp2_prefill.py's Triton tiles, kernels/sp2_wgmma.py's BLOCK_M, SBMM with other
tiles than its table's, "sbmm_*"), `us_base`
(x @ W.T, cuBLAS, fp16 W [N, K]: the same math on dense weights, the practical limit of a dense-dot kernel here),
and `best`: the fastest config with `speedup` = us_sbmm / its µs
and `over_base` = its µs / us_base; `us_diag`: the timing-only variants (configs with "diag": wrong results, never
`best`). Also the dense-equivalent TFLOP/s (2 T N K / time). Outputs are compared with
SBMM's on every case (`max_abs_diff`, `max_rel_diff`). Timing: CUDA graphs of back-to-back calls on rotating slots
(bench/sbmm.py `graph_us`). The JSON suggests `delta_linear.SP2_PREFILL_ROWS`: the smallest row count from which
the best config beats SBMM over a whole layer (four launches summed) at every larger count, for 1 and 4 deltas.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm import WORKER_SHAPES, graph_us  # noqa: E402
from bench.sbmm_prefill import crossover  # noqa: E402
from bench.sbmm_stacks import variant_stack  # noqa: E402
from kernels import sbmm, sp2_prefill, sp2_wgmma, sp2_wgmma_ws  # noqa: E402

ROWS = (32, 64, 128, 256, 512)
SEGMENTS = (1, 4)
SLOTS = 8  # rotated over, so consecutive calls do not find their delta in L2
CONFIGS = {
    "m64n64w2": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_W": 2, "num_warps": 4, "num_stages": 2},
    "m128n64w2": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_W": 2, "num_warps": 8, "num_stages": 2},
    "m128n128w2": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_W": 2, "num_warps": 8, "num_stages": 2},
    "m128n64w4": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_W": 4, "num_warps": 8, "num_stages": 2},
    "pipe_m64_s3": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 3},  # kernels/sp2_wgmma.py (Hopper)
    "pipe_m64_s4": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 4},
    "pipe_m64_s4_nopf": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 4, "prefetch": 0},
    "pipe_m64_s4_f32sel": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 4, "f16_select": False},
    "pipe_m128_s3": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 3},
    "pipe_m128_s4": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 4},
    "pipe_m64_s3_wg2": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 3, "warpgroups": 2},
    "pipe_m64_s4_wg2": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 4, "warpgroups": 2},
    "pipe_m128_s3_wg2": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 3, "warpgroups": 2},
    "pipe_m128_s4_wg2": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 4, "warpgroups": 2},
    "pipe_m64_s3_wg4": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 3, "warpgroups": 4},
    "pipe_m64_s4_wg4": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 4, "warpgroups": 4},
    "pipe_m128_s3_wg2_l1": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 3, "warpgroups": 2, "prefetch": 2},
    "pipe_m128_s3_wg2_nopf": {"kernel": "wgmma", "BLOCK_M": 128, "stages": 3, "warpgroups": 2, "prefetch": 0},
    "pipe_m64_s3_wg2_l1": {"kernel": "wgmma", "BLOCK_M": 64, "stages": 3, "warpgroups": 2, "prefetch": 2},
    "ws_m128": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 3, "a_stages": 2},  # kernels/sp2_wgmma_ws.py
    "ws_m128_k1": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 3, "a_stages": 2, "split": 1},  # no split-K
    "ws_m128_x4": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 4, "a_stages": 2},
    # timing only (wrong results, not compared, never `best`): no expansion / no MMAs, both at one program a tile
    "ws_m128_d1": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 3, "a_stages": 2, "split": 1, "diag": 1},
    "ws_m128_d2": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 3, "a_stages": 2, "split": 1, "diag": 2},
    "ws_m128_a3": {"kernel": "ws", "BLOCK_M": 128, "x_stages": 3, "a_stages": 3},
    "ws_m64": {"kernel": "ws", "BLOCK_M": 64, "x_stages": 4, "a_stages": 2},
}
# SBMM itself (kernels/sbmm_spmma2.py) with larger delta-row blocks than its table's: x is re-read from L2 once for
# every BLOCK_N delta rows (docs/kernels.md run 31), and the L1 serves the warps of a program
CONFIGS.update({f"sbmm_m{bm}n{bn}w{w}": {"kernel": "sbmm", "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w,
                                          "min_ctas": 256}
                for bm, bn, w in ((16, 128, 2), (16, 256, 4), (16, 512, 8), (16, 256, 8), (16, 128, 4),
                                  (8, 256, 8))})
# The table's prefill entry (BLOCK_M 16, BLOCK_N 128, 2 warps, prefetch) at other split-K targets: it splits K
# until min_ctas programs. Run 32 found no split 1.11-1.44x faster at qkv 1 x 64, o 4 x 64, o 1 x 256 and down 1 x 64
# but 0.88x at down 1 x 128; run 33 (s30b, s30d: two sweeps, within 1-2% of each other) made 256 the table's target
# (docs/kernels.md). sbmm_split256 is the table's own launch now, sbmm_split1024 the old one
CONFIGS.update({f"sbmm_split{c}": {"kernel": "sbmm", "BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 2, "prefetch": True,
                                   "min_ctas": c} for c in (1, 256, 512, 768, 1024)})
SBMM_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "min_ctas", "expand", "prefetch")


def one_case(n, k, stack, weight, rows, segs, configs) -> dict:
    t = rows * segs
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + segs)
    x = torch.randn(t, k, device="cuda", dtype=torch.float16, generator=gen)
    y = torch.zeros(t, n, device="cuda", dtype=torch.float16)
    starts = list(range(0, t + 1, rows))
    starts_d = torch.tensor(starts, device="cuda", dtype=torch.int64)
    slot_lists = [list(range(o, o + segs)) for o in range(0, SLOTS, segs)]
    slot_sets = [torch.tensor(sl, device="cuda", dtype=torch.int64) for sl in slot_lists]
    q, m, s = stack["qweight"], stack["meta"], stack["scales"]

    def sbmm_call(slots):
        return lambda: sbmm.sbmm(x, y, q, m, s, None, starts_d, slots, 2, sp2=True)

    def prefill_call(slots, cfg, out=y):
        if cfg.get("kernel") == "sbmm":
            slots_d = torch.tensor(slots, device="cuda", dtype=torch.int64)  # before any capture
            config = {key: cfg[key] for key in SBMM_KEYS if key in cfg}
            return lambda: sbmm.sbmm(x, out, q, m, s, None, starts_d, slots_d, 2, sp2=True, config=config)
        blocks = sp2_prefill.block_table(starts, slots, cfg["BLOCK_M"], "cuda")  # before any capture
        if cfg.get("kernel") == "ws":
            return lambda: sp2_wgmma_ws.sp2_wgmma_ws(x, out, q, m, s, starts, slots, cfg["BLOCK_M"], blocks=blocks,
                                                     a_stages=cfg["a_stages"], x_stages=cfg["x_stages"],
                                                     split=cfg.get("split"), diag=cfg.get("diag", 0))
        if cfg.get("kernel") == "wgmma":
            return lambda: sp2_wgmma.sp2_wgmma(x, out, q, m, s, starts, slots, cfg["BLOCK_M"], blocks=blocks,
                                               stages=cfg["stages"],
                                               prefetch=cfg.get("prefetch", 1),
                                               f16_select=cfg.get("f16_select", True),
                                               warpgroups=cfg.get("warpgroups", 1))
        return lambda: sp2_prefill.sp2_prefill(x, out, q, m, s, starts, slots, config=cfg, blocks=blocks)

    want = torch.zeros_like(y)
    sbmm.sbmm(x, want, q, m, s, None, starts_d, slot_sets[0], 2, sp2=True)
    row = {"n": n, "k": k, "rows_per_delta": rows, "num_deltas": segs,
           "us_sbmm": graph_us([sbmm_call(sl) for sl in slot_sets] * 2),
           "us_base": graph_us([lambda: torch.mm(x, weight.T)] * 4), "us_prefill": {}}
    diffs = {}
    for name, cfg in configs.items():
        if cfg.get("diag"):
            row.setdefault("us_diag", {})[name] = graph_us([prefill_call(sl, cfg) for sl in slot_lists] * 2)
            continue
        got = torch.zeros_like(y)
        prefill_call(slot_lists[0], cfg, got)()
        diff = (got.float() - want.float()).abs()
        diffs[name] = (float(diff.max()), float(diff.max() / want.float().abs().max().clamp_min(1e-6)))
        row["us_prefill"][name] = graph_us([prefill_call(sl, cfg) for sl in slot_lists] * 2)
    best = min(row["us_prefill"], key=row["us_prefill"].get)
    us = row["us_prefill"][best]
    row.update(best=best, speedup=row["us_sbmm"] / us, over_base=us / row["us_base"],
               sbmm_over_base=row["us_sbmm"] / row["us_base"], tflops_prefill=2 * t * n * k / us / 1e6,
               tflops_base=2 * t * n * k / row["us_base"] / 1e6, max_abs_diff=max(d[0] for d in diffs.values()),
               max_rel_diff=max(d[1] for d in diffs.values()))
    return row


def suggest(rows: list[dict]) -> int | None:
    """`delta_linear.SP2_PREFILL_ROWS`: where the best config's layer total starts to beat SBMM's."""
    return crossover(rows, lambda c: c["us_prefill"][c["best"]], lambda c: c["us_sbmm"], SEGMENTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows per delta, comma-separated")
    p.add_argument("--configs", default="pipe_m64_s3_wg2,ws_m128,ws_m128_k1,ws_m128_x4,ws_m128_d1,ws_m128_d2",
                   help=f"kernel configs to time, comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--label", default="")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    label = f"-{a.label}" if a.label else ""
    path = Path(a.out) / f"sp2-prefill{label}-{device.replace(' ', '-')}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    row_counts = tuple(int(r) for r in a.rows.split(","))
    configs = {name: CONFIGS[name] for name in a.configs.split(",")}
    rows: list[dict] = []

    def save() -> None:
        result = {"bench": "sp2_prefill", "device": device, "commit": a.commit, "date": date,
                  "config": {"dtype": "float16", "group_size": 128, "shapes": WORKER_SHAPES, "rows": row_counts,
                             "segments": SEGMENTS, "slots": SLOTS, "kernel_configs": configs,
                             "timing": "CUDA graph of back-to-back calls on rotating slots, median of 7 replays",
                             "limit": "us_base: cuBLAS on dense fp16 weights, same rows and shape",
                             "torch": torch.__version__, "triton": triton.__version__},
                  "sp2_prefill_rows": suggest(rows), "rows": rows}
        path.write_text(json.dumps(result, indent=1))

    total = len(WORKER_SHAPES) * len(SEGMENTS) * len(row_counts)
    for name, (n, k) in WORKER_SHAPES.items():
        stack = variant_stack("2sp", SLOTS, n, k, "cuda")
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for segs in SEGMENTS:
            for r in row_counts:
                row = dict(shape=name, **one_case(n, k, stack, weight, r, segs, configs))
                rows.append(row)
                print(f"[{len(rows)}/{total}] {name:8s} {segs} x {r:4d}: sbmm {row['us_sbmm']:7.1f} "
                      f"prefill {row['us_prefill'][row['best']]:7.1f} ({row['best']}) base {row['us_base']:7.1f} us"
                      f" -> {row['speedup']:.2f}x sbmm, {row['over_base']:.2f}x base, diff {row['max_rel_diff']:.1e}",
                      flush=True)
        del stack, weight
        torch.cuda.empty_cache()
        save()
    print(f"SP2_PREFILL_ROWS suggested: {suggest(rows)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
