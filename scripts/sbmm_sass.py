"""Compile the SBMM kernels for sm_90 on a machine without a GPU and report their SASS.

  PYTHONPATH=. python scripts/sbmm_sass.py --kernel gluon --bits 4 --dtype fp16 --bn 64 --bm 16 --warps 4
Prints registers, stack, shared memory (static + dynamic) and the instruction mix of the K loop (instructions per
dense value), so kernel changes can be judged before spending device time (docs/kernels.md). --dump writes
SASS/PTX/TTGIR.
"""

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from kernels import sbmm, sbmm_gluon, sbmm_spmma, sbmm_spmma2, sbmm_triton, sp2_prefill, sp2_wgmma, sp2_wgmma_ws

DIVISIBLE = ["x_ptr", "y_ptr", "stride_xm", "stride_ym", "qw_ptr", "meta_ptr", "scales_ptr", "zeros_ptr",
             "stride_qs", "stride_qn", "stride_ms", "stride_mn", "stride_ss", "stride_sn", "seg_starts_ptr",
             "seg_slots_ptr", "stride_x", "stride_y", "q_ptr", "m_ptr", "s_ptr", "stride_qslot", "stride_sslot",
             "blocks_ptr"]


def signature(bits: int, dtype: str) -> dict:
    return {
        "x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "stride_xm": "i32", "stride_ym": "i32",
        "qw_ptr": "*i32", "meta_ptr": "*i16" if bits == 4 else "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
        "stride_qs": "i32", "stride_qn": "i32", "stride_ms": "i32", "stride_mn": "i32",
        "stride_ss": "i32", "stride_sn": "i32",
        "seg_starts_ptr": "*i64", "seg_slots_ptr": "*i64", "num_segments": "i32", "num_slots": "i32",
        "ws_ptr": "*fp32", "counters_ptr": "*i32", "stride_wss": "i32", "N": "i32",
    }


def prefill_signature(dtype: str) -> dict:
    """Runtime arguments of the two prefill kernels on sp2 words (kernels/sp2_prefill.py, kernels/sp2_wgmma.py)."""
    return {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "stride_x": "i32", "stride_y": "i32", "q_ptr": "*i32",
            "m_ptr": "*i32", "s_ptr": "*fp16", "stride_qslot": "i32", "stride_sslot": "i32", "stride_sn": "i32",
            "blocks_ptr": "*i32", "steps_per_row_block": "i32"}


def compile_kernel(a):
    """triton.compile one kernel variant for sm_90 with the constexprs the wrapper would pass."""
    tdt = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    asym = a.asym
    options = {}
    sig = signature(a.bits, a.dtype)
    if a.dense2:  # dense2 words: 2-bit codes on the 4-bit tile geometry, no meta
        sig = signature(4, a.dtype)
        sig["meta_ptr"] = "*i32"
        a.bits = sbmm.DENSE2_GEOMETRY_BITS
    if a.kernel in ("spmma", "spmma2"):  # sparse-MMA kernel on sp4 (sp2) words: its own, shorter signature
        sig = {"x_ptr": "*i32", "y_ptr": f"*{a.dtype}", "stride_xm": "i32", "stride_ym": "i32", "qw_ptr": "*i32",
               "meta_ptr": "*i32", "scales_ptr": "*fp16", "stride_qs": "i32", "stride_ms": "i32", "stride_ss": "i32",
               "stride_sn": "i32", "seg_starts_ptr": "*i64", "seg_slots_ptr": "*i64", "num_segments": "i32",
               "num_slots": "i32", "ws_ptr": "*fp32", "counters_ptr": "*i32", "stride_wss": "i32", "N": "i32"}
        num_groups = 1 if a.group == 0 else a.k // a.group
        bits = 2 if a.kernel == "spmma2" else 4
        const = dict(sbmm._spmma_constexprs(a.k, a.group or a.k, num_groups, tdt, a.bm, a.bn, a.warps, a.split_k,
                                            0 if a.no_prefetch else a.prefetch_depth, bits, a.pdl, a.x_dense,
                                            a.expand),
                     MAX_SEGS=16)
        fn = sbmm_spmma2._sbmm_spmma2_kernel if bits == 2 else sbmm_spmma._sbmm_spmma_kernel
        source = GluonASTSource
    elif a.kernel == "sp2prefill":  # kernels/sp2_prefill.py: --bm rows per block, --bn, --bw words per K step
        sig = prefill_signature(a.dtype)
        const = dict(K=a.k, GROUP_SIZE=a.group or a.k, BLOCK_M=a.bm, BLOCK_N=a.bn, BLOCK_W=a.bw, DOT_FP32=False)
        fn, source = sp2_prefill._sp2_prefill_kernel, ASTSource
    elif a.kernel == "sp2wgmma":  # kernels/sp2_wgmma.py: --bm rows of x a program, --warps 4 per 64 delta rows
        sig = prefill_signature(a.dtype)
        const = sp2_wgmma.constexprs(a.k, a.group or a.k, a.bm, stages=a.wgmma_stages,
                                     prefetch=0 if a.no_prefetch else a.wgmma_prefetch, warpgroups=a.warps // 4)
        fn, source = sp2_wgmma._sp2_wgmma_pipe_kernel, GluonASTSource
    elif a.kernel == "sp2ws":  # kernels/sp2_wgmma_ws.py: --bm rows of x a program (4 + 8 warps, 128 delta rows)
        sig = prefill_signature(a.dtype)
        const = sp2_wgmma_ws.constexprs(a.k, a.group or a.k, a.bm, x_stages=a.wgmma_stages,
                                        prefetch=0 if a.no_prefetch else a.wgmma_prefetch, split=a.split_k,
                                        diag=a.diag)
        fn, source = sp2_wgmma_ws._sp2_wgmma_ws_kernel, GluonASTSource
        a.warps, options = 4, {"maxnreg": sp2_wgmma_ws.MAX_REGS}
    elif a.kernel == "gluon":  # the wrapper's own constexprs for this shape
        n = 4096 + (a.bn // 2 if a.odd_n else 0)
        num_groups = 1 if a.group == 0 else a.k // a.group
        const = dict(sbmm._gluon_constexprs(n, a.k, a.group or a.k, num_groups, a.bits, asym, tdt, a.bm, a.bn,
                                            a.warps, not a.no_prefetch, a.split_k, a.dense2, not a.scale_each,
                                            a.tiled),
                     MAX_SEGS=16)
        fn, source = sbmm_gluon._sbmm_gluon_kernel, GluonASTSource
    else:
        group = a.k if a.group == 0 else a.group
        mode = 0 if a.group == 0 else (1 if group % a.bk == 0 else 2)
        asm, cons = sbmm._program(a.bits, asym, tdt) if a.asm else ("", "")
        magic = 1024.0 if a.dtype == "fp16" else 128.0
        z2 = sbmm._half2_const(magic if asym else magic + (1 << (a.bits - 1)), tdt)
        for gluon_only in ("ws_ptr", "counters_ptr", "stride_wss"):  # the split-K workspace is Gluon's alone
            del sig[gluon_only]
        sig["K"] = "constexpr"
        sig["group_size"] = "i32"
        const = dict(K=a.k, BITS=a.bits, ASYM=asym, SCALE_MODE=mode, BLOCK_M=a.bm, BLOCK_N=a.bn, BLOCK_K=a.bk,
                     MAX_SEGS=16, EVEN_K=a.k % a.bk == 0, USE_ASM=a.asm, ASM=asm, CONSTRAINTS=cons,
                     Z2=z2 if a.asm else 0, DOT_FP32=False, TILED=a.tiled)
        fn, source = sbmm_triton._sbmm_kernel, ASTSource
    for name in const:
        sig[name] = "constexpr"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n in names}
    src = source(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": a.warps, "num_stages": a.stages, **options})


def cuobjdump(cubin: bytes, flag: str) -> str:
    """Run the cuobjdump bundled with Triton on a cubin (-sass or -res-usage)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def loop_body(sass: str) -> list[str]:
    """Instructions of the largest backward-branch loop (the K loop)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    best = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)\s*0x([0-9a-f]+)", ln)
        if m:
            target = int(m.group(1), 16)
            if target < addr[i] and addr[i] - target > best[1] - best[0]:
                best = (target, addr[i])
    return [ln for a, ln in zip(addr, lines) if best[0] <= a <= best[1]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="gluon",
                   choices=["gluon", "spmma", "spmma2", "triton", "sp2prefill", "sp2wgmma", "sp2ws"],
                   help="spmma: kernels/sbmm_spmma.py (sp4 words, mma.sp; 4-bit symmetric, group 0 or 128); "
                   "spmma2: kernels/sbmm_spmma2.py (sp2 words, 2-bit symmetric; --bits is ignored)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--asym", action="store_true")
    p.add_argument("--asm", action="store_true", help="triton kernel: use the PTX expander")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group", type=int, default=128, help="0: per-row scales")
    p.add_argument("--odd-n", action="store_true")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--prefetch-depth", type=int, default=1, help="spmma: K steps in flight (1 or 2)")
    p.add_argument("--pdl", action="store_true", help="spmma: programmatic dependent launch (griddepcontrol)")
    p.add_argument("--x-dense", action="store_true", help="spmma: x read as given (4-byte loads, no sp4_x copy)")
    p.add_argument("--expand", choices=("shift", "fma"), default="shift",
                   help="spmma / spmma2: the word expander (kernels/sbmm_spmma.py FMA_SHIFTS)")
    p.add_argument("--dense2", action="store_true", help="gluon: dense2 words (kernels/layout.py), 2-bit")
    p.add_argument("--scale-each", action="store_true",
                   help="gluon dense2: scale every value in the expander instead of the accumulator")
    p.add_argument("--tiled", action="store_true", help="4-bit words and meta stored tile-major (kernels/layout.py)")
    p.add_argument("--split-k", type=int, default=1, help="gluon: K splits (fp32 partials, last CTA reduces); "
                   "sp2ws: programs a tile along K (fp16 atomic adds)")
    p.add_argument("--diag", type=int, default=0, help="sp2ws: timing variant (1 no expansion, 2 no MMAs)")
    p.add_argument("--bm", type=int, default=16)
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=128)
    p.add_argument("--bw", type=int, default=2, help="sp2prefill: canonical words (32 columns each) per K step")
    p.add_argument("--wgmma-stages", type=int, default=3, help="sp2wgmma: x buffers of 128 columns (3+)")
    p.add_argument("--wgmma-prefetch", type=int, default=1, help="sp2wgmma: words prefetched to L2 (1), L1 (2)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--dump", default="")
    a = p.parse_args()
    ck = compile_kernel(a)
    sass = cuobjdump(ck.asm["cubin"], "-sass")
    if a.dump:
        for ext, text in (("sass", sass), ("ptx", ck.asm["ptx"]), ("ttgir", ck.asm["ttgir"])):
            with open(f"{a.dump}.{ext}", "w") as f:
                f.write(text)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", cuobjdump(ck.asm["cubin"], "-res-usage"))
    body = loop_body(sass)
    ops = collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln).group(1).split(".")[0]
                              for ln in body)
    block_k = (8 * 64 // a.bits if a.kernel in ("gluon", "spmma") else 256 if a.kernel == "spmma2"
               else 32 * a.bw if a.kernel == "sp2prefill" else 128 if a.kernel in ("sp2wgmma", "sp2ws") else a.bk)
    dense = a.bn * block_k
    print(f"regs={usage.group(1)} stack={usage.group(2)} shared={usage.group(3)}+{ck.metadata.shared} "
          f"loop_instructions={len(body)} per_dense_value={len(body) * 32 * a.warps / dense:.2f}")
    print(" ".join(f"{k}:{v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
