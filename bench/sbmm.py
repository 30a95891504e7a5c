"""SBMM benchmark on Llama-2-7B layer shapes against dense and torch baselines (GPU).

  python bench/sbmm.py --out DIR [--sweep] [--commit SHA] [--quick]

Rows: one per (shape, num_deltas, rows_per_delta, bits) with the SBMM time, bytes it must read (packed
deltas + meta + scales + x + y), effective GB/s, that as a fraction of the device-to-device copy rate
measured in the same run, and speedups over (a) a torch loop of dense fp16 per-segment matmuls,
(b) torch.bmm over already-gathered dense deltas, (c) dequantize-then-matmul in torch, plus (d) the base
GEMM alone and base GEMM followed by SBMM. --sweep instead times kernel/config variants on two shapes.
Timing: triton.testing.do_bench medians (L2 flushed before every call). Writes
DIR/sbmm-<device>-<date>.json; bench/plot_sbmm.py draws the PNG from it.
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
from kernels import packing, reference, sbmm  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}  # name -> (N, K)
NUM_DELTAS = (1, 2, 4, 8, 16, 32, 64)
ROWS = (1, 4, 16)
NIBBLE_OF_PATTERN = torch.tensor([i0 | (i1 << 2) for i0, i1 in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]])


def random_stack(num_slots: int, n: int, k: int, bits: int, group: int | None, device: str) -> dict:
    """Valid random packed deltas generated on the device (any int32 word is a valid set of codes)."""
    g = torch.Generator(device=device).manual_seed(num_slots * 7 + bits)
    qweight = torch.randint(-2**31, 2**31 - 1, (num_slots, n, k * bits // 64), dtype=torch.int32, device=device,
                            generator=g)
    pat = torch.randint(0, 6, (num_slots, n, k // 32, 8), device=device, generator=g)
    nib = NIBBLE_OF_PATTERN.to(device)[pat].to(torch.int64) << (4 * torch.arange(8, device=device))
    meta = packing._to_int32(nib.sum(-1))
    groups = 1 if group is None else k // group
    scales = (torch.rand(num_slots, n, groups, device=device, generator=g) * 1e-3 + 1e-4).half()
    return {"qweight": qweight, "meta": meta, "scales": scales, "zeros": None}


def packed_bytes(stack: dict, num: int) -> int:
    return sum(t[:num].numel() * t.element_size() for t in stack.values() if t is not None)


def bench(fn, rep_ms: int = 60) -> float:
    """Median microseconds of fn (L2 flushed before each call by do_bench)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def copy_limit_gbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), 200)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e9


def segments(num: int, rows: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(num + 1, device=device, dtype=torch.int64) * rows
    return starts, torch.arange(num, device=device, dtype=torch.int64)


def one_row(name, n, k, num, rows, bits, stack, dense, base_w, limit, with_dequant) -> dict:
    """Time SBMM and the baselines for one point."""
    t = num * rows
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    y = torch.randn(t, n, device="cuda", dtype=torch.float16)
    starts, slots = segments(num, rows, "cuda")
    parts = [stack[key][:num] if stack[key] is not None else None for key in ("qweight", "meta", "scales", "zeros")]

    def run_sbmm():
        sbmm.sbmm(x, y, *parts, starts, slots, bits)

    us = bench(run_sbmm)
    w = dense[:num]  # [num, N, K] fp16, gathered already (best case for the bmm baseline)
    y3, x3 = y.view(num, rows, n), x.view(num, rows, k)

    def loop_dense():
        for s in range(num):
            y[s * rows:(s + 1) * rows].addmm_(x[s * rows:(s + 1) * rows], w[s].T)

    us_loop = bench(loop_dense)
    us_bmm = bench(lambda: y3.baddbmm_(x3, w.transpose(1, 2)))
    us_base = bench(lambda: torch.mm(x, base_w.T))

    def base_then_sbmm():
        out = torch.mm(x, base_w.T)
        sbmm.sbmm(x, out, *parts, starts, slots, bits)

    us_base_sbmm = bench(base_then_sbmm)
    row = {"shape": name, "n": n, "k": k, "num_deltas": num, "rows_per_delta": rows, "bits": bits, "us": us,
           "us_dense_loop": us_loop, "us_bmm": us_bmm, "us_base": us_base, "us_base_plus_sbmm": us_base_sbmm}
    nbytes = packed_bytes(stack, num) + x.numel() * 2 + y.numel() * 2
    row["bytes_read"] = nbytes
    row["gbps"] = nbytes / (us * 1e-6) / 1e9
    row["fraction_of_limit"] = row["gbps"] / limit
    row["speedup_vs_dense_loop"] = us_loop / us
    row["speedup_vs_bmm"] = us_bmm / us
    row["base_plus_sbmm_over_base"] = us_base_sbmm / us_base
    if with_dequant:
        def dequant_matmul():
            reference.sbmm_reference(x, y, *parts[:3], None, bits, (n, k), starts, slots)
        us_dq = bench(dequant_matmul, 20)
        row["us_dequant_matmul"] = us_dq
        row["speedup_vs_dequant_matmul"] = us_dq / us
    return row


def full(args, limit) -> list[dict]:
    rows_out = []
    for name, (n, k) in SHAPES.items():
        base_w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        dense = torch.randn(max(NUM_DELTAS), n, k, device="cuda", dtype=torch.float16) * 1e-3
        for bits in (4, 2):
            stack = random_stack(max(NUM_DELTAS), n, k, bits, 128, "cuda")
            for num in NUM_DELTAS:
                for rows in ROWS:
                    with_dq = rows == 4 and num in (1, 8)
                    r = one_row(name, n, k, num, rows, bits, stack, dense, base_w, limit, with_dq)
                    rows_out.append(r)
                    print(f"{name:8s} N={num:2d} rows={rows:2d} {bits}b  {r['us']:8.1f} us  {r['gbps']:6.0f} GB/s "
                          f"{r['fraction_of_limit']:5.2f}  x{r['speedup_vs_bmm']:4.1f} vs bmm  "
                          f"base+sbmm/base {r['base_plus_sbmm_over_base']:4.2f}", flush=True)
            del stack
        del dense, base_w
        torch.cuda.empty_cache()
    return rows_out


SWEEP = [
    ("triton", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}),
    ("triton", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "use_asm": True}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "prefetch": True}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "prefetch": False}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "prefetch": True}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "prefetch": True}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "prefetch": False}),
    ("gluon", {"BLOCK_M": 8, "BLOCK_N": 64, "num_warps": 4, "prefetch": True}),
    ("gluon", {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 2, "prefetch": True}),
    ("gluon", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "prefetch": False}),
    ("gluon", {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "prefetch": False}),
    ("triton", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}),
]


def sweep(limit) -> list[dict]:
    out = []
    for name, num, rows in (("qkvo", 8, 4), ("qkvo", 32, 1), ("gate_up", 8, 16), ("qkvo", 1, 4), ("qkvo", 4, 256)):
        n, k = SHAPES[name]
        for bits in (4, 2):
            stack = random_stack(num, n, k, bits, 128, "cuda")
            x = torch.randn(num * rows, k, device="cuda", dtype=torch.float16)
            y = torch.randn(num * rows, n, device="cuda", dtype=torch.float16)
            starts, slots = segments(num, rows, "cuda")
            nbytes = packed_bytes(stack, num) + x.numel() * 2 + y.numel() * 2
            for kernel, cfg in SWEEP:
                try:
                    us = bench(lambda: sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None,
                                                 starts, slots, bits, kernel=kernel, config=cfg))
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                    print(f"FAIL {kernel} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                gbps = nbytes / (us * 1e-6) / 1e9
                out.append({"shape": name, "num_deltas": num, "rows_per_delta": rows, "bits": bits, "kernel": kernel,
                            "config": cfg, "us": us, "bytes_read": nbytes, "gbps": gbps,
                            "fraction_of_limit": gbps / limit})
                print(f"{name:8s} N={num:2d} r={rows:2d} {bits}b {kernel:6s} {json.dumps(cfg):90s} {us:8.1f} us "
                      f"{gbps:6.0f} GB/s {gbps / limit:5.2f}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    limit = copy_limit_gbps()
    print(f"{device}: device-to-device copy {limit:.0f} GB/s", flush=True)
    rows = sweep(limit) if a.sweep else full(a, limit)
    date = datetime.date.today().isoformat()
    result = {"bench": "sbmm", "device": device, "commit": a.commit, "date": date,
              "config": {"mode": "sweep" if a.sweep else "full", "copy_limit_gbps": limit, "dtype": "float16",
                         "group_size": 128, "sym": True, "shapes": SHAPES, "timing": "do_bench median, L2 flushed",
                         "bytes_read": "packed deltas + meta + scales + x + y (read)",
                         "sbmm_configs": json.loads(sbmm.CONFIG_FILE.read_text()),
                         "torch": torch.__version__, "triton": triton.__version__},
              "rows": rows}
    tag = device.replace(" ", "-")
    path = Path(a.out) / f"sbmm{'-sweep' if a.sweep else ''}-{tag}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
