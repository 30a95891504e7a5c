"""Launch options of the sparse-MMA SBMM kernels against the tuned config, in the same run (GPU).

  python bench/sbmm_options.py --out DIR [--commit SHA] [--variants 4sp,2sp] [--cases qkvo:8:1,...] [--tag T]

Options (config keys, kernels/sbmm.py): `x_dense` reads x as given with 4-byte loads instead of a copy of x in
the B order (spmma_layout.sp4_x, a kernel of its own per call, or per x shared through an sbmm.Workspace);
`pdl` launches with programmatic dependent launch: a launch may start while the one before it on the stream is
still running, its programs find their tile and load their first K steps of deltas, then wait
(griddepcontrol.wait) before reading x or y. Per point and option set, timed as CUDA graphs of back-to-back calls
on rotating slots (bench/sbmm.py `graph_us`):
  - `call`: an SBMM call as bench/sbmm.py's `us_workspace` (a workspace without a counter memset; a fresh x,
    so the sp4_x copy, per call);
  - `kernel`: SBMM calls back to back on one x (one copy of x, as q / k / v share one);
  - `worker`: base GEMM (cuBLAS) then SBMM into its output, a fresh x per call (o, down);
and the fraction of the device-to-device copy rate (bench/sbmm.py's limit, measured here) for `call`.
Checks first: y after back-to-back eager calls, a captured graph, and (pdl) a launch whose programs all exit early
(every segment without a delta) between two real ones, equal to the tuned config's (max |diff| must be 0).
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm import FUSED_SHAPES, SHAPES, copy_limits_gbps, graph_us, packed_bytes, rotations  # noqa: E402
from bench.sbmm_stacks import VARIANTS, variant_stack  # noqa: E402
from kernels import sbmm  # noqa: E402

CASES = ("qkvo:8:1,qkvo:8:4,qkvo:8:16,qkvo:16:1,qkvo:16:4,qkvo:64:1,qkvo:64:16,gate_up:8:1,gate_up:8:4,gate_up:64:4,"
         "down:8:1,down:8:4,down:32:16")
ALL_SHAPES = {**SHAPES, **FUSED_SHAPES}  # the layer's linears and the worker's fused q/k/v, gate/up (--cases)
OPTIONS = {"tuned": {}, "x_dense": {"x_dense": True}, "pdl": {"pdl": True},
           "x_dense+pdl": {"x_dense": True, "pdl": True},
           "expand_fma": {"expand": "fma"}}  # the word expander with fewer shifts (kernels/sbmm_spmma.py FMA_SHIFTS)


def tuned(stack: dict, num: int, rows: int, n: int, bits: int) -> dict:
    kind = "spmma2" if stack.get("sp2") else "spmma"
    return sbmm.pick_config(kind, torch.cuda.get_device_name(), rows, bits, n, num)


def check(stack: dict, n: int, k: int, bits: int, num: int, rows: int, option: dict) -> float:
    """Max |y_option - y_tuned| over three sequences (must be 0: same arithmetic, same split order)."""
    t = num * rows
    g = torch.Generator(device="cuda").manual_seed(num * 31 + rows)
    x = torch.randn(t, k, device="cuda", dtype=torch.float16, generator=g)
    y0 = torch.randn(t, n, device="cuda", dtype=torch.float16, generator=g)
    starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
    offsets = rotations(num, stack["qweight"].shape[0])[:4]
    slot_sets = [torch.arange(o, o + num, device="cuda", dtype=torch.int64) for o in offsets]
    none = torch.full((num,), -1, device="cuda", dtype=torch.int64)
    configs = [tuned(stack, num, rows, n, bits)]
    configs.append(dict(configs[0], **option))
    sp = {"sp4": stack.get("sp4", False), "sp2": stack.get("sp2", False)}

    def call(y, cfg, slots, ws):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits, config=cfg,
                  workspace=ws, **sp)

    worst = 0.0
    for sets in (slot_sets, [slot_sets[0], none, slot_sets[1], none, none, slot_sets[2]]):
        ys = []
        for cfg in configs:
            y, ws = y0.clone(), sbmm.Workspace(x.device)
            for slots in sets:
                call(y, cfg, slots, ws)
            ys.append(y)
        worst = max(worst, (ys[0].float() - ys[1].float()).abs().max().item())
    ys = []
    for cfg in configs:  # captured (pdl: the programmatic edges of a graph)
        y, ws = y0.clone(), sbmm.Workspace(x.device)
        for slots in slot_sets:  # compile, and make the workspace's counters, outside the capture
            call(y.clone(), cfg, slots, ws)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for slots in slot_sets:
                call(y, cfg, slots, ws)
        graph.replay()
        torch.cuda.synchronize()
        ys.append(y)
    return max(worst, (ys[0].float() - ys[1].float()).abs().max().item())


def point(name: str, variant: str, stack: dict, num: int, rows: int, base_ws: list, limit: float,
          options: list[str]) -> dict:
    n, k = ALL_SHAPES[name]
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
           "layout": "sp2" if sp["sp2"] else "sp4", "config": base, "bytes_read": nbytes, "options": {}}
    for opt in options:
        cfg = dict(base, **OPTIONS[opt])
        ws = sbmm.Workspace(x.device)

        def sbmm_call(slots, out=None, fresh_x=False, cfg=cfg, ws=ws):
            if fresh_x:
                ws.forget_x()
            sbmm.sbmm(x, y if out is None else out, stack["qweight"], stack["meta"], stack["scales"], None, starts,
                      slots, bits, config=cfg, workspace=ws, **sp)

        def worker_call(i, slots):
            def run():
                sbmm_call(slots, torch.mm(x, base_ws[i % len(base_ws)].T), True)
            return run

        res = {"max_abs_diff": 0.0 if opt == "tuned" else check(stack, n, k, bits, num, rows, OPTIONS[opt]),
               "us_call": graph_us([(lambda sl=sl: sbmm_call(sl, fresh_x=True)) for sl in slot_sets]),
               "us_kernel": graph_us([(lambda sl=sl: sbmm_call(sl)) for sl in slot_sets]),
               "us_worker": graph_us([worker_call(i, sl) for i, sl in enumerate(slot_sets)])}
        res["fraction_call"] = nbytes / (res["us_call"] * 1e-6) / 1e9 / limit
        row["options"][opt] = res
    row["us_base"] = graph_us([(lambda i=i: torch.mm(x, base_ws[i % len(base_ws)].T)) for i in range(8)])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    p.add_argument("--variants", default="4sp,2sp")
    p.add_argument("--cases", default=CASES, help="shape:deltas:rows,...")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"option sets: {', '.join(OPTIONS)}")
    p.add_argument("--tag", default="", help="file name tag")
    a = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("bench/sbmm_options.py needs a CUDA GPU with programmatic dependent launch (sm_90+)")
    limits = copy_limits_gbps()
    limit = limits["do_bench"]
    device = torch.cuda.get_device_name()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{a.tag}" if a.tag else ""
    path = out / f"sbmm-options{tag}-{device.replace(' ', '-')}-{datetime.date.today()}.json"
    options = a.options.split(",")
    cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in a.cases.split(",")]
    rows = []
    print(f"{device}: copy limit {limit:.0f} GB/s (graph-timed copy {limits['graph']:.0f})", flush=True)
    for name in dict.fromkeys(c[0] for c in cases):
        n, k = ALL_SHAPES[name]
        base_ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(4)]
        most = max(num for c, num, _ in cases if c == name)
        for variant in a.variants.split(","):
            stack = variant_stack(variant, min(64, max(8, 2 * most)), n, k, "cuda")
            for case, num, r in cases:
                if case != name:
                    continue
                row = point(name, variant, stack, num, r, base_ws, limit, options)
                rows.append(row)
                print(f"{name:8s} {row['layout']} N={num:2d} rows={r:2d} base {row['us_base']:5.1f}", flush=True)
                for opt, res in row["options"].items():
                    print(f"    {opt:12s} call {res['us_call']:6.1f} us ({res['fraction_call']:.2f})  kernel "
                          f"{res['us_kernel']:6.1f}  worker {res['us_worker']:6.1f}  diff {res['max_abs_diff']}",
                          flush=True)
                path.write_text(json.dumps({
                    "bench": "sbmm_options", "option_sets": {o: OPTIONS[o] for o in options}, "device": device,
                    "commit": a.commit, "date": str(datetime.date.today()),
                    "copy_limit_gbps": limit, "copy_gbps_by_timer": limits,
                    "timing": "CUDA graph of back-to-back calls on rotating slots, median of 7 replays",
                    "torch": torch.__version__, "rows": rows}, indent=1))
            del stack
            torch.cuda.empty_cache()
    bad = [(r["shape"], r["num_deltas"], r["rows_per_delta"], r["layout"], o) for r in rows
           for o, res in r["options"].items() if res["max_abs_diff"] != 0]
    print(f"wrote {path}; {len(rows)} points; results unequal to the tuned config's: {bad or 'none'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
