"""Prefill-sized segments: SBMM against the dense route (Δ expanded once + cuBLAS), to set `dense_rows` (GPU).

  python bench/sbmm_prefill.py --out bench/results [--quick]

For each launch of a worker with fused projections (q/k/v as one, o, gate/up as one, down; Llama-2-7B), code width
(sp4 4-bit, sp2 2-bit), rows per segment and segment count (1 or 4 deltas), in the same run:
- `us_sbmm`: one SBMM launch over all segments (the tuned config `sbmm.plan` picks);
- `us_dense`: kernels/delta_linear.py `dense_linear` per segment (sbmm.dequantize_rows into a buffer, then addmm);
- `us_base`: the base GEMM of the same rows (x @ W.T, fp16 W [N, K]), the cost both add to;
- `host_us_sbmm` / `host_us_dense`: wall time per eager call of each route, launched back to back (an eager
  prefill step pays the larger of host and device time);
- `us_dequant`: the expansion alone, one delta, with its bytes (packed read + dense written) as a fraction of the
  device-to-device copy rate measured in the same run (the physical limit: ~3.0 TB/s on an H100).
Both routes' outputs are compared on every case (`max_rel_diff`). Timing: CUDA graphs of back-to-back calls on
rotating slots (bench/sbmm.py `graph_us`). The JSON's `dense_rows` suggests, per code width, the smallest measured
row count from which the dense route is faster over a whole layer (the four launches summed) at every larger
count measured, for 1 and 4 deltas alike: a lower bound on kernels/sbmm_configs.json's per-device value, which
the eager prefill steps' host time raises (bench/worker.py --parts long-prefill-ab; docs/kernels.md run 22).
This compares the additive route (delta + cuBLAS after the base GEMM); the worker's merged route saves the base
GEMM of those rows on top.
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
from bench.sbmm import WORKER_SHAPES, copy_limits_gbps, graph_us, host_us  # noqa: E402
from bench.sbmm_stacks import variant_stack  # noqa: E402
from kernels import delta_linear, sbmm  # noqa: E402
from kernels.delta_linear import PackedDeltaStack  # noqa: E402

ROWS = (32, 64, 128, 192, 256, 384, 512, 1024, 2048)
SEGMENTS = (1, 4)
SLOTS = 8  # rotated over, so consecutive calls do not find their delta in L2


def packed(stack: dict, bits: int, n: int, k: int) -> PackedDeltaStack:
    return PackedDeltaStack(qweight=stack["qweight"], meta=stack["meta"], scales=stack["scales"], zeros=None,
                            bits=bits, group_size=128, sym=True, shape=(n, k), sp4=bits == 4, sp2=bits == 2)


def one_case(name, n, k, bits, stack, weight, rows, segs) -> dict:
    t = rows * segs
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + segs)
    x = torch.randn(t, k, device="cuda", dtype=torch.float16, generator=gen)
    y = torch.zeros(t, n, device="cuda", dtype=torch.float16)
    starts = torch.arange(0, t + 1, rows, device="cuda", dtype=torch.int64)
    offsets = range(0, SLOTS, segs)
    slot_sets = [torch.arange(o, o + segs, device="cuda", dtype=torch.int64) for o in offsets]
    q, m, s = stack["qweight"], stack["meta"], stack["scales"]
    p = packed(stack, bits, n, k)

    def sbmm_call(slots):
        return lambda: sbmm.sbmm(x, y, q, m, s, None, starts, slots, bits, sp4=bits == 4, sp2=bits == 2)

    def dense_call(o):
        def run():
            for i in range(segs):
                delta_linear.dense_linear(x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows], p, o + i)
        return run

    us_sbmm = graph_us([sbmm_call(sl) for sl in slot_sets] * 2)
    us_dense = graph_us([dense_call(o) for o in offsets] * 2)
    us_base = graph_us([lambda: torch.mm(x, weight.T)] * 4)
    host = {"host_us_sbmm": host_us(sbmm_call(slot_sets[0]), 20), "host_us_dense": host_us(dense_call(0), 20)}
    # the two routes on the same input: both add x @ Δ.T to zeros
    y.zero_()
    sbmm_call(slot_sets[0])()
    via_sbmm = y.float().clone()
    y.zero_()
    dense_call(0)()
    diff = ((y.float() - via_sbmm).abs().max() / via_sbmm.abs().max().clamp_min(1e-12)).item()
    return {"shape": name, "n": n, "k": k, "bits": bits, "rows_per_delta": rows, "num_deltas": segs,
            "us_sbmm": us_sbmm, "us_dense": us_dense, "us_base": us_base, "dense_speedup": us_sbmm / us_dense,
            "sbmm_over_base": us_sbmm / us_base, "dense_over_base": us_dense / us_base, "max_rel_diff": diff,
            **host}


def dequant_row(name, n, k, bits, stack, limit) -> dict:
    out = torch.empty(n, k, device="cuda", dtype=torch.float16)
    q, m, s = stack["qweight"], stack["meta"], stack["scales"]
    us = graph_us([lambda i=i: sbmm.dequantize_rows(q[i], m[i], s[i], bits, k, out) for i in range(SLOTS)])
    nbytes = q[0].numel() * 4 + m[0].numel() * 4 + s[0].numel() * 2 + out.numel() * 2
    return {"shape": name, "n": n, "k": k, "bits": bits, "us_dequant": us, "bytes": nbytes,
            "fraction_of_limit": nbytes / (us * 1e-6) / 1e9 / limit}


def crossover(rows: list[dict], us_new, us_old, segments=SEGMENTS) -> int | None:
    """The smallest measured rows per delta from which a route's layer total (the four launches: sum of
    `us_new(row)`) beats the other's (`us_old(row)`) at every larger measured count, for every segment count; None
    if it never does. A segment count with no rows at some count does not count against it."""
    best = None
    for r in sorted({row["rows_per_delta"] for row in rows}, reverse=True):
        for segs in segments:
            case = [row for row in rows if row["rows_per_delta"] == r and row["num_deltas"] == segs]
            if case and sum(us_new(c) for c in case) >= sum(us_old(c) for c in case):
                return best
        best = r
    return best


def suggest(rows: list[dict], bits: int) -> int | None:
    """`dense_rows` for one code width: where the dense route's layer total starts to beat SBMM's (`crossover`)."""
    return crossover([row for row in rows if row["bits"] == bits], lambda c: c["us_dense"], lambda c: c["us_sbmm"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="rows 64, 256, 1024 only")
    p.add_argument("--rows", default="", help="rows per delta, comma-separated, instead of the built-in list")
    p.add_argument("--label", default="")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    limits = copy_limits_gbps()
    limit = max(limits.values())
    print(f"{device}: device-to-device copy {limits} GB/s, limit {limit:.0f}", flush=True)
    date = datetime.date.today().isoformat()
    label = f"-{a.label}" if a.label else ""
    path = Path(a.out) / f"sbmm-prefill{label}-{device.replace(' ', '-')}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    row_counts = (tuple(int(r) for r in a.rows.split(",")) if a.rows else (64, 256, 1024) if a.quick
                  else ROWS)
    rows, dequant = [], []

    def save() -> None:
        result = {"bench": "sbmm_prefill", "device": device, "commit": a.commit, "date": date,
                  "config": {"copy_limit_gbps": limit, "copy_gbps_by_timer": limits, "dtype": "float16",
                             "group_size": 128, "shapes": WORKER_SHAPES, "rows": row_counts, "segments": SEGMENTS,
                             "slots": SLOTS, "dense_chunk_bytes": delta_linear.DENSE_CHUNK_BYTES,
                             "timing": "CUDA graph of back-to-back calls on rotating slots, median of 7 replays",
                             "torch": torch.__version__, "triton": triton.__version__},
                  "dense_rows": {str(b): suggest(rows, b) for b in (4, 2)},
                  "dequant": dequant, "rows": rows}
        path.write_text(json.dumps(result, indent=1))

    for bits, variant in ((4, "4sp"), (2, "2sp")):
        for name, (n, k) in WORKER_SHAPES.items():
            stack = variant_stack(variant, SLOTS, n, k, "cuda")
            weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            d = dequant_row(name, n, k, bits, stack, limit)
            dequant.append(d)
            print(f"{name:8s} {bits}b dequant {d['us_dequant']:8.1f} us {d['fraction_of_limit']:.2f} of the copy rate",
                  flush=True)
            for segs in SEGMENTS:
                for r in row_counts:
                    row = one_case(name, n, k, bits, stack, weight, r, segs)
                    rows.append(row)
                    print(f"{name:8s} {bits}b {segs} x {r:5d}: sbmm {row['us_sbmm']:8.1f} dense {row['us_dense']:8.1f} "
                          f"base {row['us_base']:8.1f} us  dense {row['dense_speedup']:.2f}x  "
                          f"rel diff {row['max_rel_diff']:.1e}", flush=True)
            del stack, weight
            torch.cuda.empty_cache()
            save()
    save()
    print(f"dense_rows suggested: {json.dumps({str(b): suggest(rows, b) for b in (4, 2)})}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
