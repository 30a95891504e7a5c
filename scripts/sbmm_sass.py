"""Compile the SBMM kernel for sm_90 on a machine without a GPU and report its SASS.

Usage: PYTHONPATH=. python scripts/sbmm_sass.py --bits 4 --dtype fp16 [--no-asm] [--dump out.sass]
Prints register/spill counts and the instruction mix of the K loop, so kernel changes can be judged by
instructions per dense value before spending device time (docs/kernels.md).
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

from kernels import sbmm


def compile_kernel(bits: int, dtype: str, use_asm: bool, asym: bool, k: int, group: int | None, cfg: dict):
    """triton.compile the kernel for sm_90 with the wrapper's constexprs."""
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    block_k = cfg["BLOCK_K"]
    scale_mode = sbmm.SCALE_ROW if group is None else (sbmm.SCALE_TILE if group % block_k == 0 else sbmm.SCALE_SPLIT)
    asm, cons = sbmm._program(bits, asym, tdt) if use_asm else ("", "")
    magic = 1024.0 if dtype == "fp16" else 128.0
    z2 = sbmm._half2_const(magic if asym else magic + (1 << (bits - 1)), tdt)
    sig = {
        "x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "stride_xm": "i32", "stride_ym": "i32",
        "qw_ptr": "*i32", "meta_ptr": "*i16" if bits == 4 else "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp16",
        "stride_qs": "i32", "stride_qn": "i32", "stride_ms": "i32", "stride_mn": "i32",
        "stride_ss": "i32", "stride_sn": "i32",
        "seg_starts_ptr": "*i64", "seg_slots_ptr": "*i64", "num_segments": "i32", "num_slots": "i32",
        "N": "i32", "group_size": "i32",
    }
    const = dict(K=k, BITS=bits, ASYM=asym, SCALE_MODE=scale_mode, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=block_k, MAX_SEGS=16, EVEN_K=k % block_k == 0, USE_ASM=use_asm, ASM=asm,
                 CONSTRAINTS=cons, Z2=z2, DOT_FP32=False)
    for name in const:
        sig[name] = "constexpr"
    src = ASTSource(fn=sbmm._sbmm_kernel, signature=sig, constexprs=const)
    opts = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


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
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)\s*0x([0-9a-f]+)", ln) or re.search(r"BRA .*\(\.L_x_(\d+)\)", ln)
        if m and "0x" in ln:
            tgt = int(m.group(1), 16)
            if tgt < addr[i] and addr[i] - tgt > best[1] - best[0]:
                best = (tgt, addr[i])
    return [ln for a, ln in zip(addr, lines) if best[0] <= a <= best[1]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--no-asm", action="store_true")
    p.add_argument("--asym", action="store_true")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--bm", type=int, default=16)
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=128)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--dump", default="")
    a = p.parse_args()
    cfg = dict(BLOCK_M=a.bm, BLOCK_N=a.bn, BLOCK_K=a.bk, num_warps=a.warps, num_stages=a.stages)
    ck = compile_kernel(a.bits, a.dtype, not a.no_asm, a.asym, a.k, a.group or None, cfg)
    sass = cuobjdump(ck.asm["cubin"], "-sass")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", cuobjdump(ck.asm["cubin"], "-res-usage"))
    if a.dump:
        with open(a.dump, "w") as f:
            f.write(sass)
        with open(a.dump + ".ttgir", "w") as f:
            f.write(ck.asm["ttgir"])
        with open(a.dump + ".ptx", "w") as f:
            f.write(ck.asm["ptx"])
    body = loop_body(sass)
    ops = collections.Counter(re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", ln).group(1).split(".")[0] for ln in body)
    threads = 32 * a.warps
    dense = a.bn * a.bk
    print(f"regs={usage.group(1)} stack={usage.group(2)} shared={ck.metadata.shared} loop_instr={len(body)}")
    print(f"thread-instructions per dense value: {len(body) * threads / dense:.2f}")
    print(" ".join(f"{k}:{v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
