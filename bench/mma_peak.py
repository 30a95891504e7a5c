"""Tensor-core throughput of the instructions our kernels issue, against cuBLAS in the same run (GPU).

  python bench/mma_peak.py --out bench/results [--label x]

The SBMM kernels (kernels/sbmm_spmma*.py) multiply on the warp-level sparse MMA (`mma.sp` m16n8k32, the
Ampere instruction); the Hopper prefill kernels (kernels/sp2_wgmma*.py) expand Δ with it and multiply on the
warpgroup MMA (`wgmma`, what cuBLAS uses on Hopper). This measures, with nothing but MMAs in flight (INDEPENDENT
accumulator chains per warp, every SM full, no memory traffic):
- `mma_dense`: `mma.sync` m16n8k16 fp16 x fp16 -> fp32 (4 096 FLOP a warp instruction);
- `mma_sparse`: `mma.sp::ordered_metadata` m16n8k32 fp16 -> fp32 (8 192 dense-equivalent FLOP: a 2:4 A);
- `cublas`: torch.mm of two 8192 x 8192 fp16 matrices (fp32 accumulation), the dense peak the base GEMM sees.
Each as TFLOP/s (dense-equivalent for the sparse one) and as a fraction of cuBLAS's. If `mma_sparse` stays
far under `cublas`, no SBMM on `mma.sp` can match the base GEMM at prefill sizes, whatever it does with its
bytes: its delta product has the base GEMM's dense-equivalent FLOPs. The MMAs' inputs are near-constant (few bits
toggle, less power than cuBLAS's random data, so possibly higher clocks): read the ratio as an upper bound.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_io import git_commit, write_results  # noqa: E402

CHAINS = 8  # independent accumulators a thread keeps in flight
DENSE = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
         "{$10, $11, $12, $13};", ",".join(["=f"] * 4 + ["r"] * 6 + ["f"] * 4))
SPARSE = ("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, "
          "{$4, $5, $6, $7}, {$8, $9, $10, $11}, {$13, $14, $15, $16}, $12, 0;",
          ",".join(["=f"] * 4 + ["r"] * 9 + ["f"] * 4))


@triton.jit
def _step(c, a, b, meta, ASM: tl.constexpr, CONS: tl.constexpr, SPARSE_MMA: tl.constexpr):
    if SPARSE_MMA:
        return tl.inline_asm_elementwise(ASM, CONS, [a, a, a, a, b, b, b, b, meta, c[0], c[1], c[2], c[3]],
                                         dtype=(tl.float32,) * 4, is_pure=False, pack=1)
    return tl.inline_asm_elementwise(ASM, CONS, [a, a, a, a, b, b, c[0], c[1], c[2], c[3]],
                                     dtype=(tl.float32,) * 4, is_pure=False, pack=1)


@triton.jit
def _mma_loop(out_ptr, seed, iters, ASM: tl.constexpr, CONS: tl.constexpr, SPARSE_MMA: tl.constexpr,
              BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = (lane & 7) * 0x00010001 + seed  # fp16 pairs near 1.0 (seed 0x3C003C00), not constants the compiler knows
    b = a ^ 0x00400040
    meta = a * 0 + 0x44444444  # kept positions (0, 1) of every group of four
    zero = tl.zeros([BLOCK], tl.float32)
    c0 = (zero, zero, zero, zero)
    c1 = (zero, zero, zero, zero)
    c2 = (zero, zero, zero, zero)
    c3 = (zero, zero, zero, zero)
    c4 = (zero, zero, zero, zero)
    c5 = (zero, zero, zero, zero)
    c6 = (zero, zero, zero, zero)
    c7 = (zero, zero, zero, zero)
    for _ in range(iters):
        c0 = _step(c0, a, b, meta, ASM, CONS, SPARSE_MMA)
        c1 = _step(c1, a, b, meta, ASM, CONS, SPARSE_MMA)
        c2 = _step(c2, a, b, meta, ASM, CONS, SPARSE_MMA)
        c3 = _step(c3, a, b, meta, ASM, CONS, SPARSE_MMA)
        c4 = _step(c4, a, b, meta, ASM, CONS, SPARSE_MMA)
        c5 = _step(c5, a, b, meta, ASM, CONS, SPARSE_MMA)
        c6 = _step(c6, a, b, meta, ASM, CONS, SPARSE_MMA)
        c7 = _step(c7, a, b, meta, ASM, CONS, SPARSE_MMA)
    total = c0[0] + c1[1] + c2[2] + c3[3] + c4[0] + c5[1] + c6[2] + c7[3]
    tl.store(out_ptr + lane, total)


def time_ms(fn, repeats: int = 5) -> float:
    """Median of `repeats` timed calls (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def mma_tflops(sparse: bool, iters: int, num_warps: int, programs_per_sm: int) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block = 32 * num_warps
    grid = sms * programs_per_sm
    out = torch.empty(grid * block, device="cuda", dtype=torch.float32)
    asm, cons = SPARSE if sparse else DENSE

    def run():
        _mma_loop[(grid,)](out, 0x3C003C00, iters, ASM=asm, CONS=cons, SPARSE_MMA=sparse, BLOCK=block,
                           num_warps=num_warps)

    ms = time_ms(run)
    flop = grid * num_warps * iters * CHAINS * (8192 if sparse else 4096)
    return {"ms": ms, "tflops": flop / ms / 1e9, "warps_per_sm": num_warps * programs_per_sm, "iters": iters,
            "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--label", default="")
    p.add_argument("--iters", type=int, default=4096)
    p.add_argument("--commit", default="", help="default: BENCH_COMMIT or this checkout's HEAD")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()

    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.float16)
    w = torch.randn(n, n, device="cuda", dtype=torch.float16)
    cublas_ms = time_ms(lambda: torch.mm(x, w))
    cublas = 2 * n ** 3 / cublas_ms / 1e9
    print(f"cublas fp16 {n}^3: {cublas_ms:.3f} ms, {cublas:.0f} TFLOP/s", flush=True)
    rows = []
    for sparse in (False, True):
        for warps, per_sm in ((4, 2), (4, 4), (8, 2)):
            r = {"instruction": "mma_sparse" if sparse else "mma_dense", "num_warps": warps,
                 **mma_tflops(sparse, a.iters, warps, per_sm)}
            r["of_cublas"] = r["tflops"] / cublas
            rows.append(r)
            print(f"{r['instruction']:10s} {r['warps_per_sm']:2d} warps/SM: {r['tflops']:6.0f} TFLOP/s "
                  f"(dense-equivalent), {r['of_cublas']:.2f} of cuBLAS", flush=True)
    best = {kind: max(r["tflops"] for r in rows if r["instruction"] == kind) for kind in ("mma_dense", "mma_sparse")}
    result = {"bench": "mma_peak", "device": device, "commit": a.commit or git_commit(), "date": date,
              "config": {"chains_per_thread": CHAINS, "cublas_shape": [n, n, n], "timing": "median of 5 CUDA-event "
                         "timed launches after a warm-up", "limit": "cublas: dense fp16 torch.mm in the same run",
                         "torch": torch.__version__, "triton": triton.__version__},
              "cublas_tflops": cublas, "best_tflops": best,
              "best_of_cublas": {k: v / cublas for k, v in best.items()}, "rows": rows}
    path = write_results(Path(a.out), "mma-peak", f"{a.label}-{device}" if a.label else device, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
