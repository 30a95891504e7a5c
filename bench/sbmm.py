"""SBMM benchmark on Llama-2-7B layer shapes against dense and torch baselines (GPU).

  python bench/sbmm.py --out DIR [--sweep] [--commit SHA] [--quick]

Rows: one per (shape, num_deltas, rows_per_delta, bits, layout) with the SBMM time, bytes it must read (packed
deltas + meta + scales + x + y), effective GB/s, that as a fraction of the device-to-device copy rate
measured in the same run, and speedups over (a) a torch loop of dense fp16 per-segment matmuls,
(b) torch.bmm over already-gathered dense deltas, (c) dequantize-then-matmul in torch, plus (d) the base
GEMM alone and base GEMM followed by SBMM. --sweep instead times kernel/config variants on two shapes.
Timing: each measurement is a CUDA graph of many back-to-back calls, every call on different delta slots
(and base weights), so no call finds its deltas in L2 and no host launch overhead is counted; the host
cost of one apply call is reported separately (host_us). `us` is a call on its own (a fresh split-K counter
buffer, so a memset, and a copy of x for the sparse-MMA kernels unless the config reads x as given, `x_dense`);
`us_workspace` is a call as the worker makes it, with an sbmm.Workspace shared by the graph's calls (counters
zeroed once, x still copied per call where it is copied). Word layouts (--variants): 4sp = 4-bit words and meta in
the sp4 order of the sparse-MMA kernel (kernels/sbmm_spmma.py) and 2sp = 2-bit in the sp2 order of
kernels/sbmm_spmma2.py, the layouts the worker keeps on sm_80+ GPUs; 4t = 4-bit 2:4 words and meta tile-major and
2d2 = 2-bit dense2 words (kernels/layout.py: older GPUs, asymmetric or odd-group deltas); 4 and 2 = the canonical
2:4 words in row order. --shapes worker: the launches of a worker with fused q/k/v and gate/up. Writes
DIR/sbmm-<device>-<date>.json with the issue's goals summed up per layout (`goals`, bench/sbmm_goals.py);
bench/plot_sbmm.py draws the PNG from it.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm_goals import describe, goal_summary  # noqa: E402
from bench.sbmm_stacks import VARIANTS, layout_name, variant_label, variant_stack  # noqa: E402
from kernels import layout, reference, sbmm, spmma_layout  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}  # name -> (N, K)
# --sweep cases only: q, k, v (gate, up) as one launch over their stacked rows, what a fused projection would launch
FUSED_SHAPES = {"qkv": (3 * 4096, 4096), "gate_up2": (2 * 11008, 4096)}
# what a worker with fused projections (its default) launches per layer: q/k/v as one, o, gate/up as one, down
WORKER_SHAPES = {"qkv": FUSED_SHAPES["qkv"], "o": SHAPES["qkvo"], "gate_up2": FUSED_SHAPES["gate_up2"],
                 "down": SHAPES["down"]}
SHAPE_SETS = {"layer": SHAPES, "worker": WORKER_SHAPES}
NUM_DELTAS = (1, 2, 4, 8, 16, 32, 64)
ROWS = (1, 4, 16)


def packed_bytes(stack: dict, num: int) -> int:
    return sum(t[:num].numel() * t.element_size() for t in stack.values() if isinstance(t, torch.Tensor))


def bench(fn, rep_ms: int = 60) -> float:
    """Median microseconds of fn via do_bench (L2 flushed before each call; includes host launch time)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def graph_us(calls: list, replays: int = 7) -> float:
    """Mean device µs per call: the calls captured back to back in one CUDA graph, median over replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / warm up outside the capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Wall µs per call of fn launched back to back (host launch cost when the GPU keeps up)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def rotations(num: int, total: int = 64) -> list[int]:
    """Slot offsets so consecutive calls read different deltas (>= 8 calls, all slots touched)."""
    offsets = list(range(0, total - num + 1, num)) or [0]
    return (offsets * (8 // len(offsets) + 1))[:max(8, len(offsets))]


def copy_limits_gbps() -> dict[str, float]:
    """Device-to-device copy of 1 GiB, bytes read + written per second, timed two ways (graph, do_bench)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 2
    return {"graph": nbytes / (graph_us([lambda: dst.copy_(src)] * 4) * 1e-6) / 1e9,
            "do_bench": nbytes / (bench(lambda: dst.copy_(src), 200) * 1e-6) / 1e9}


def one_row(name, n, k, num, rows, bits, stack, dense, base_ws, limit, with_dequant, kernel=None, config=None,
            config_extra=None, baseline_table=None):
    """Time SBMM and the baselines for one point (graphs over rotating slots); config_extra: keys merged into
    the launch config the wrapper would pick (the tuned table's entry); baseline_table: a config table (the form
    of kernels/sbmm_configs.json) whose pick is timed too, as `us_baseline_table`, when it differs."""
    t = num * rows
    sp4, sp2 = stack.get("sp4", False), stack.get("sp2", False)

    def tuned(table=None):  # the config the wrapper picks for this point (from another config table if given)
        kind = "spmma2" if sp2 else "spmma" if sp4 else kernel or "gluon"
        return sbmm.pick_config(kind, torch.cuda.get_device_name(), rows, "dense2" if stack["meta"] is None else bits,
                                n, num, table=table)

    if config_extra:
        kernel = kernel or "gluon"
        config = {**(config or tuned()), **config_extra}
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    y = torch.randn(t, n, device="cuda", dtype=torch.float16)
    starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
    offs = rotations(num)
    slot_sets = [torch.arange(o, o + num, device="cuda", dtype=torch.int64) for o in offs]
    q, m, sc, tiled = stack["qweight"], stack["meta"], stack["scales"], stack.get("tiled", False)

    def sbmm_call(slots, launch_config=config):
        return lambda: sbmm.sbmm(x, y, q, m, sc, None, starts, slots, bits, kernel=kernel, config=launch_config,
                                 tiled=tiled, sp4=sp4, sp2=sp2)

    ws = sbmm.Workspace(x.device)

    def workspace_call(slots):  # as the worker launches: one workspace, so no counter memset; x copied per call
        def run():
            ws.forget_x()
            sbmm.sbmm(x, y, q, m, sc, None, starts, slots, bits, kernel=kernel, config=config, tiled=tiled, sp4=sp4,
                      sp2=sp2, workspace=ws)
        return run

    us = graph_us([sbmm_call(sl) for sl in slot_sets])
    row = {"shape": name, "n": n, "k": k, "num_deltas": num, "rows_per_delta": rows, "bits": bits, "us": us,
           "layout": layout_name(stack)}
    nbytes = packed_bytes(stack, num) + x.numel() * 2 + y.numel() * 2
    row.update(bytes_read=nbytes, gbps=nbytes / (us * 1e-6) / 1e9)
    row["fraction_of_limit"] = row["gbps"] / limit
    row["us_workspace"] = graph_us([workspace_call(sl) for sl in slot_sets])
    row["fraction_of_limit_workspace"] = nbytes / (row["us_workspace"] * 1e-6) / 1e9 / limit
    row["host_us"] = host_us(sbmm_call(slot_sets[0]))
    if baseline_table is not None:
        old = tuned(baseline_table)
        row["baseline_table_config"] = old
        if old == (config or tuned()):  # the same launch: no second timing
            row["us_baseline_table"] = us
        else:
            row["us_baseline_table"] = graph_us([sbmm_call(sl, old) for sl in slot_sets])
        row["fraction_of_limit_baseline_table"] = nbytes / (row["us_baseline_table"] * 1e-6) / 1e9 / limit
    if dense is None:
        return row
    y3, x3 = y.view(num, rows, n), x.view(num, rows, k)

    def loop_call(o):
        def run():
            for s in range(num):
                y[s * rows:(s + 1) * rows].addmm_(x[s * rows:(s + 1) * rows], dense[o + s].T)
        return run

    def bmm_call(o):  # deltas already gathered (contiguous slots): the best case for the bmm baseline
        return lambda: y3.baddbmm_(x3, dense[o:o + num].transpose(1, 2))

    def base_call(i):
        return lambda: torch.mm(x, base_ws[i % len(base_ws)].T)

    def base_sbmm_call(i, slots):
        def run():
            out = torch.mm(x, base_ws[i % len(base_ws)].T)
            sbmm.sbmm(x, out, q, m, sc, None, starts, slots, bits, kernel=kernel, config=config, tiled=tiled,
                      sp4=sp4, sp2=sp2)
        return run

    row["us_dense_loop"] = graph_us([loop_call(o) for o in offs])
    row["us_bmm"] = graph_us([bmm_call(o) for o in offs])
    row["us_base"] = graph_us([base_call(i) for i in range(8)])
    row["us_base_plus_sbmm"] = graph_us([base_sbmm_call(i, sl) for i, sl in enumerate(slot_sets)])
    row["speedup_vs_dense_loop"] = row["us_dense_loop"] / us
    row["speedup_vs_bmm"] = row["us_bmm"] / us
    row["base_plus_sbmm_over_base"] = row["us_base_plus_sbmm"] / row["us_base"]
    if with_dequant:  # the torch reference reads row order: the first `num` slots, re-ordered once
        q_rows, m_rows = (layout.untile_packed(q[:num], m[:num]) if tiled else
                          spmma_layout.unpack_sp4(q[:num], m[:num]) if sp4 else
                          spmma_layout.unpack_sp2(q[:num], m[:num]) if sp2 else (q, m))

        def dequant_matmul():
            reference.sbmm_reference(x, y, q_rows, m_rows, sc, None, bits, (n, k), starts, slot_sets[0])
        us_dq = bench(dequant_matmul, 20)
        row["us_dequant_matmul"] = us_dq
        row["speedup_vs_dequant_matmul"] = us_dq / us
    return row


def full(args, limit, save, baseline=None) -> list[dict]:
    """baseline: the --baseline-configs table (parsed), or None."""
    extra = json.loads(args.config_extra) if args.config_extra else None
    rows_out = []
    for name, (n, k) in SHAPE_SETS[args.shapes].items():
        base_ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(4)]
        dense = torch.randn(max(NUM_DELTAS), n, k, device="cuda", dtype=torch.float16) * 1e-3
        for variant in args.variants.split(","):
            bits = VARIANTS[variant][0]
            stack = variant_stack(variant, max(NUM_DELTAS), n, k, "cuda")
            for num in NUM_DELTAS:
                for rows in ROWS:
                    with_dq = rows == 4 and num in (1, 8) and stack["meta"] is not None
                    r = one_row(name, n, k, num, rows, bits, stack, dense, base_ws, limit, with_dq,
                                config_extra=extra, baseline_table=baseline)
                    rows_out.append(r)
                    print(f"{name:8s} N={num:2d} rows={rows:2d} {variant_label(variant)} {r['us']:8.1f} us {r['gbps']:6.0f} GB/s "
                          f"{r['fraction_of_limit']:5.2f}  x{r['speedup_vs_bmm']:4.1f} vs bmm  "
                          f"base+sbmm/base {r['base_plus_sbmm_over_base']:4.2f} host {r['host_us']:.0f} us"
                          + (f"  baseline table {r['fraction_of_limit_baseline_table']:5.2f}"
                             if "us_baseline_table" in r else ""), flush=True)
                save(rows_out)  # a run cut short still leaves every finished row on disk
            del stack
        del dense, base_ws
        torch.cuda.empty_cache()
    return rows_out


GLUON_BASE = {"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 2, "prefetch": True}
SWEEP = [
    ("gluon", GLUON_BASE),
    ("gluon", {**GLUON_BASE, "min_ctas": 1024}),
    ("gluon", {**GLUON_BASE, "min_ctas": 2048}),
    ("gluon", {**GLUON_BASE, "min_ctas": 4096}),
    ("gluon", {**GLUON_BASE, "min_ctas": 8192}),
    ("gluon", {**GLUON_BASE, "BLOCK_M": 16}),
    ("gluon", {**GLUON_BASE, "BLOCK_M": 16, "min_ctas": 2048}),
    ("gluon", {**GLUON_BASE, "BLOCK_N": 32, "min_ctas": 2048}),
    ("gluon", {**GLUON_BASE, "BLOCK_N": 128, "num_warps": 4, "min_ctas": 2048}),
    ("gluon", {**GLUON_BASE, "prefetch": False, "min_ctas": 2048}),
    # dense2 words: the accumulator takes the scale (default) vs every value scaled (scale_after false)
    ("gluon", {**GLUON_BASE, "min_ctas": 1024, "scale_after": False}),
    ("gluon", {**GLUON_BASE, "prefetch": False, "min_ctas": 2048, "scale_after": False}),
    ("gluon", {**GLUON_BASE, "prefetch": False, "min_ctas": 1024}),
    ("gluon", {**GLUON_BASE, "BLOCK_M": 16, "prefetch": False}),
    ("gluon", {**GLUON_BASE, "BLOCK_M": 16, "prefetch": False, "min_ctas": 1024}),
    ("gluon", {**GLUON_BASE, "BLOCK_N": 128, "prefetch": False, "min_ctas": 1024}),
    ("gluon", {**GLUON_BASE, "BLOCK_N": 128, "BLOCK_M": 16, "prefetch": False, "min_ctas": 1024}),
]
# (shape, distinct deltas, rows per delta): decode points around the N >= 8 goal, one small-N, one prefill
SWEEP_CASES = (("qkvo", 8, 4), ("qkvo", 8, 16), ("qkvo", 32, 1), ("gate_up", 8, 4), ("down", 8, 4),
               ("gate_up", 32, 16), ("qkvo", 1, 4), ("qkvo", 2, 1), ("qkvo", 4, 256))


def sweep(limit, save=None, variants=("4t", "2", "2d2"), cases=SWEEP_CASES, configs=None) -> list[dict]:
    """variants: keys of VARIANTS ("4t" tile-major and "4" row-order 4-bit, "2d2" dense2 and "2" 2:4 2-bit);
    configs: Gluon launch configs to time instead of SWEEP."""
    out = []
    for name, num, rows in cases:
        n, k = SHAPES[name] if name in SHAPES else FUSED_SHAPES[name]
        for variant in variants:
            bits = VARIANTS[variant][0]
            stack = variant_stack(variant, 64, n, k, "cuda")
            dense2 = stack["meta"] is None
            for kernel, cfg in ([("gluon", c) for c in configs] if configs else SWEEP):
                if num * rows >= 256 and cfg.get("min_ctas"):
                    # prefill has programs enough (one delta with 32 rows is a decode batch: it may not); said, so a
                    # sweep whose configs all set min_ctas does not drop its prefill cases silently
                    print(f"skip {name} N={num} r={rows}: {json.dumps(cfg)} (min_ctas at >= 256 rows)", flush=True)
                    continue
                if (stack.get("sp4") or stack.get("sp2")) and kernel != "gluon":
                    continue  # sp4 / sp2 words run on the sparse-MMA kernels only (they take the Gluon configs)
                try:
                    r = one_row(name, n, k, num, rows, bits, stack, None, None, limit, False, kernel, cfg)
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                    print(f"FAIL {kernel} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                geometry = sbmm.DENSE2_GEOMETRY_BITS if dense2 else bits
                r.update(kernel=kernel, config=cfg,
                         split_k=sbmm.split_k(cfg, n, k, geometry, num * rows, num) if kernel == "gluon" else 1)
                out.append(r)
                print(f"{name:8s} N={num:2d} r={rows:3d} {variant_label(variant)} {kernel:6s} {json.dumps(cfg):90s} "
                      f"split {r['split_k']} {r['us']:8.1f} us {r['gbps']:6.0f} GB/s {r['fraction_of_limit']:5.2f}",
                      flush=True)
            del stack
            if save:
                save(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--variants", default="4t,2d2,2", help="full run: word layouts, comma-separated: 4t (4-bit "
                   "tile-major), 2d2 (2-bit dense2): the worker's; 4sp, 2sp (sparse-MMA kernels); 4, 2 (2:4 words in "
                   "row order)")
    p.add_argument("--sweep-variants", default="4t,2,2d2", help="the same choice for --sweep")
    p.add_argument("--sweep-cases", default="", help="--sweep: shape:deltas:rows,... instead of the built-in "
                   "cases, e.g. qkvo:8:4,gate_up:32:16")
    p.add_argument("--sweep-configs", default="", help="--sweep: JSON list of Gluon configs instead of the "
                   'built-in ones, e.g. \'[{"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 2, "maxnreg": 96}]\'')
    p.add_argument("--config-extra", default="", help='full run: JSON merged into every tuned launch config, '
                   'e.g. \'{"scale_after": false}\' (recorded in the JSON)')
    p.add_argument("--baseline-configs", default="", help="full run: a config table file (the form of "
                   "kernels/sbmm_configs.json, e.g. an earlier commit's) whose picks are timed too, in the same run "
                   "(us_baseline_table)")
    p.add_argument("--shapes", choices=tuple(SHAPE_SETS), default="layer", help="full run: the Llama-2-7B layer's "
                   "linears (layer) or the launches of a worker with fused projections (worker: q/k/v as one, o, "
                   "gate/up as one, down)")
    p.add_argument("--label", default="", help="file name suffix, e.g. scale-each")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    limits = copy_limits_gbps()
    limit = max(limits.values())  # the higher reading: fractions of it are the conservative ones
    print(f"{device}: device-to-device copy {limits} GB/s, limit {limit:.0f}", flush=True)
    date = datetime.date.today().isoformat()
    tag = device.replace(" ", "-")
    label = f"-{a.label}" if a.label else ""
    path = Path(a.out) / f"sbmm{'-sweep' if a.sweep else ''}{label}-{tag}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    baseline = json.loads(Path(a.baseline_configs).read_text()) if a.baseline_configs else None  # read once

    def save(rows: list[dict]) -> None:
        result = {"bench": "sbmm", "device": device, "commit": a.commit, "date": date,
                  "config": {"mode": "sweep" if a.sweep else "full", "copy_limit_gbps": limit,
                             "variants": (a.sweep_variants if a.sweep else a.variants).split(","),
                             "config_extra": a.config_extra or None,
                             "baseline_configs": baseline,
                             "copy_gbps_by_timer": limits, "dtype": "float16", "group_size": 128, "sym": True,
                             "shapes": {**SHAPES, **FUSED_SHAPES} if a.sweep else SHAPE_SETS[a.shapes],
                             "timing": "CUDA graph of back-to-back calls on rotating slots, median of 7 replays",
                             "bytes_read": "packed deltas + meta + scales + x + y (read)",
                             "sbmm_configs": json.loads(sbmm.CONFIG_FILE.read_text()),
                             "torch": torch.__version__, "triton": triton.__version__},
                  "goals": None if a.sweep else goal_summary(rows),
                  "rows": rows}
        path.write_text(json.dumps(result, indent=1))

    if a.sweep:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in a.sweep_cases.split(",")
                 if c] or SWEEP_CASES
        configs = json.loads(a.sweep_configs) if a.sweep_configs else None
        save(sweep(limit, save, a.sweep_variants.split(","), cases, configs))
    else:
        rows = full(a, limit, save, baseline)
        save(rows)
        print(describe(goal_summary(rows)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
