"""Programmatic dependent launch (PDL) for the sparse-MMA SBMM kernels, against plain launches in the same run (GPU).

  python bench/sbmm_pdl.py --out DIR [--commit SHA] [--variants 4sp,2sp] [--cases qkvo:8:1,...]

A launch with PDL may start while the launch before it on the stream is still running: its programs find their
tile and load their first K steps of deltas, then wait (griddepcontrol.wait) before reading x or y. So the ramp of
one launch overlaps the tail of the one before, which is most of a small launch's time (bench/sbmm.py: about 10 µs
per call at every size). Per point, all timed as CUDA graphs of back-to-back calls on rotating slots (bench/sbmm.py
`graph_us`), each without and with PDL:
  - `kernel`: SBMM calls back to back on one x (one sparse-MMA copy of x, as q / k / v share one);
  - `worker`: the worker's order per linear: base GEMM (cuBLAS), then SBMM into its output;
  - `grouped` (qkvo only): three base GEMMs, then the three SBMMs back to back (q, k, v);
and the fraction of the device-to-device copy rate (bench/sbmm.py's limit, measured here) of `kernel`.
Checks first: y after back-to-back eager calls, a captured graph, and a launch whose programs all exit early
(every segment without a delta) between two real ones, equal with and without PDL (max |diff| must be 0).
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm import SHAPES, copy_limits_gbps, graph_us, packed_bytes, rotations  # noqa: E402
from bench.sbmm_stacks import VARIANTS, variant_stack  # noqa: E402
from kernels import sbmm  # noqa: E402

CASES = "qkvo:1:1,qkvo:8:1,qkvo:8:4,qkvo:16:1,qkvo:16:4,qkvo:64:1,gate_up:8:1,gate_up:8:4,down:8:1,down:8:4"


def tuned(stack: dict, num: int, rows: int, n: int, bits: int) -> dict:
    kind = "spmma2" if stack.get("sp2") else "spmma"
    return sbmm.pick_config(kind, torch.cuda.get_device_name(), rows, bits, n, num)


def check(stack: dict, n: int, k: int, bits: int, num: int, rows: int) -> float:
    """Max |y_pdl - y_plain| over three sequences (must be 0: same arithmetic, same split order)."""
    t = num * rows
    g = torch.Generator(device="cuda").manual_seed(num * 31 + rows)
    x = torch.randn(t, k, device="cuda", dtype=torch.float16, generator=g)
    y0 = torch.randn(t, n, device="cuda", dtype=torch.float16, generator=g)
    starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
    offsets = rotations(num, stack["qweight"].shape[0])[:4]
    slot_sets = [torch.arange(o, o + num, device="cuda", dtype=torch.int64) for o in offsets]
    none = torch.full((num,), -1, device="cuda", dtype=torch.int64)
    base = tuned(stack, num, rows, n, bits)
    sp = {"sp4": stack.get("sp4", False), "sp2": stack.get("sp2", False)}

    def run(y, pdl, sets):
        ws = sbmm.Workspace(x.device)
        for slots in sets:
            sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                      config=dict(base, pdl=pdl), workspace=ws, **sp)

    worst = 0.0
    for sets in (slot_sets, [slot_sets[0], none, slot_sets[1], none, none, slot_sets[2]]):
        ys = []
        for pdl in (False, True):
            y = y0.clone()
            run(y, pdl, sets)
            ys.append(y)
        worst = max(worst, (ys[0].float() - ys[1].float()).abs().max().item())
    ys = []
    for pdl in (False, True):  # captured: the programmatic edges of a graph
        y = y0.clone()
        run(y.clone(), pdl, slot_sets)  # compile and make the workspace outside the capture
        graph = torch.cuda.CUDAGraph()
        ws = sbmm.Workspace(x.device)
        for slots in slot_sets:
            sbmm.sbmm(x, y.clone(), stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                      config=dict(base, pdl=pdl), workspace=ws, **sp)
        with torch.cuda.graph(graph):
            for slots in slot_sets:
                sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                          config=dict(base, pdl=pdl), workspace=ws, **sp)
        graph.replay()
        torch.cuda.synchronize()
        ys.append(y)
    worst = max(worst, (ys[0].float() - ys[1].float()).abs().max().item())
    return worst


def point(name: str, variant: str, stack: dict, num: int, rows: int, base_ws: list, limit: float) -> dict:
    n, k = SHAPES[name]
    bits = VARIANTS[variant][0]
    t = num * rows
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    y = torch.randn(t, n, device="cuda", dtype=torch.float16)
    starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
    offsets = rotations(num, stack["qweight"].shape[0])
    slot_sets = [torch.arange(o, o + num, device="cuda", dtype=torch.int64) for o in offsets]
    sp = {"sp4": stack.get("sp4", False), "sp2": stack.get("sp2", False)}
    base = tuned(stack, num, rows, n, bits)
    nbytes = packed_bytes(stack, num) + x.numel() * 2 + y.numel() * 2  # as bench/sbmm.py counts them
    row = {"shape": name, "n": n, "k": k, "num_deltas": num, "rows_per_delta": rows, "bits": bits,
           "layout": "sp2" if sp["sp2"] else "sp4", "config": base, "bytes_read": nbytes,
           "max_abs_diff_pdl": check(stack, n, k, bits, num, rows)}
    for pdl in (False, True):
        cfg = dict(base, pdl=pdl)
        ws = sbmm.Workspace(x.device)

        def kernel_call(slots, cfg=cfg, ws=ws):
            return lambda: sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots,
                                     bits, config=cfg, workspace=ws, **sp)

        def worker_call(i, slots, cfg=cfg, ws=ws):
            def run():
                out = torch.mm(x, base_ws[i % len(base_ws)].T)
                sbmm.sbmm(x, out, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                          config=cfg, workspace=ws, **sp)
            return run

        def grouped_call(i, slots, cfg=cfg, ws=ws):  # q, k, v: three GEMMs, then three SBMMs on one x
            def run():
                outs = [torch.mm(x, base_ws[(i + j) % len(base_ws)].T) for j in range(3)]
                for j, out in enumerate(outs):
                    sbmm.sbmm(x, out, stack["qweight"], stack["meta"], stack["scales"], None, starts,
                              slot_sets[(i + j) % len(slot_sets)], bits, config=cfg, workspace=ws, **sp)
            return run

        tag = "pdl" if pdl else "plain"
        row[f"us_kernel_{tag}"] = graph_us([kernel_call(sl) for sl in slot_sets])
        row[f"us_worker_{tag}"] = graph_us([worker_call(i, sl) for i, sl in enumerate(slot_sets)])
        if name == "qkvo":
            row[f"us_grouped_{tag}"] = graph_us([grouped_call(i, sl) for i, sl in enumerate(slot_sets)]) / 3
        row[f"fraction_kernel_{tag}"] = nbytes / (row[f"us_kernel_{tag}"] * 1e-6) / 1e9 / limit
    row["us_base"] = graph_us([(lambda i=i: torch.mm(x, base_ws[i % len(base_ws)].T)) for i in range(8)])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    p.add_argument("--variants", default="4sp,2sp")
    p.add_argument("--cases", default=CASES, help="shape:deltas:rows,...")
    a = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("bench/sbmm_pdl.py needs a CUDA GPU with programmatic dependent launch (sm_90+)")
    limits = copy_limits_gbps()
    limit = limits["do_bench"]
    device = torch.cuda.get_device_name()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sbmm-pdl-{device.replace(' ', '-')}-{datetime.date.today()}.json"
    cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in a.cases.split(",")]
    rows = []
    print(f"{device}: copy limit {limit:.0f} GB/s (graph-timed copy {limits['graph']:.0f})", flush=True)
    for name in dict.fromkeys(c[0] for c in cases):
        n, k = SHAPES[name]
        base_ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(4)]
        most = max(num for c, num, _ in cases if c == name)
        for variant in a.variants.split(","):
            stack = variant_stack(variant, min(64, max(8, 2 * most)), n, k, "cuda")
            for case, num, r in cases:
                if case != name:
                    continue
                row = point(name, variant, stack, num, r, base_ws, limit)
                rows.append(row)
                grouped = (f" grouped {row['us_grouped_plain']:6.1f} -> {row['us_grouped_pdl']:6.1f}"
                           if "us_grouped_plain" in row else "")
                print(f"{name:8s} {row['layout']} N={num:2d} rows={r:2d} kernel {row['us_kernel_plain']:6.1f} -> "
                      f"{row['us_kernel_pdl']:6.1f} us ({row['fraction_kernel_plain']:.2f} -> "
                      f"{row['fraction_kernel_pdl']:.2f} of limit)  worker {row['us_worker_plain']:6.1f} -> "
                      f"{row['us_worker_pdl']:6.1f} (base {row['us_base']:5.1f}){grouped}  "
                      f"diff {row['max_abs_diff_pdl']}", flush=True)
                path.write_text(json.dumps({
                    "bench": "sbmm_pdl", "device": device, "commit": a.commit, "date": str(datetime.date.today()),
                    "copy_limit_gbps": limit, "copy_gbps_by_timer": limits,
                    "timing": "CUDA graph of back-to-back calls on rotating slots, median of 7 replays",
                    "torch": torch.__version__, "rows": rows}, indent=1))
            del stack
            torch.cuda.empty_cache()
    bad = [r for r in rows if r["max_abs_diff_pdl"] != 0]
    print(f"wrote {path}; {len(rows)} points, {len(bad)} with PDL results unequal to plain launches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
