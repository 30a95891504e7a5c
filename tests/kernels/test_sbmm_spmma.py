"""The sparse-MMA SBMM path end to end on the CPU: sp4 words -> per-lane registers exactly as
kernels/sbmm_spmma.py addresses them -> a numpy model of mma.sp m16n8k32 written from the PTX ISA fragment and
metadata description (kernels/sbmm_spmma.py docstring) -> must equal x @ dequant(Δ).T. This checks the layout
and the register / metadata plumbing against our reading of the PTX semantics; the GPU tests check the reading.
"""

import numpy as np
import pytest
import torch

from kernels import packing, reference, sbmm, sbmm_asm, sbmm_spmma, sbmm_spmma2, spmma_layout
from tests.kernels.packed_factory import random_packed
from tests.kernels.test_sbmm import TOL, make_case

LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3


def half_value(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit patterns -> their fp16 / bf16 values as float64."""
    bits = np.asarray(bits).astype(np.uint16)
    if dtype == "f16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def expand_word(words: np.ndarray, dtype: str, bits: int = 4) -> np.ndarray:
    """Model of the sparse-MMA expanders (sbmm_spmma / sbmm_spmma2 `expand_ptx`): uint32 words [...] ->
    [..., 32 // (2 * bits) regs, 2 halves] float, code minus the zero point, of pair p (codes at bits p * bits and
    p * bits + 16)."""
    magic, zero = (sbmm_spmma if bits == 4 else sbmm_spmma2).MAGIC[dtype]
    mask = 0x000F000F if bits == 4 else 0x00030003
    regs = 32 // (2 * bits)
    out = np.empty(words.shape + (regs, 2))
    for p in range(regs):
        c = ((words >> (bits * p)) & mask) | magic
        for half in range(2):
            out[..., p, half] = half_value((c >> (16 * half)) & 0xFFFF, dtype) - half_value(
                np.array((zero >> (16 * half)) & 0xFFFF), dtype)
    return out


def run_expand_ptx(ptx: str, words: np.ndarray, dtype: str, outputs: int) -> np.ndarray:
    """Interpret an expander's PTX (shr, lop3, mov, and half2 sub / fma, each rounded once as .rn does) on uint32
    words [W] (operand $outputs) -> the output registers $0.. as values [W, outputs, 2] (low half, high half)."""
    regs = {f"${outputs}": words.astype(np.uint32)}

    def val(operand):
        return regs[operand] if operand in regs else np.full_like(words, int(operand), dtype=np.uint32)

    def halves(r):
        lo, hi = sbmm_asm._to_lanes(r, dtype)
        return lo.astype(np.float64), hi.astype(np.float64)

    for line in ptx.splitlines():
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(" ", 1)
        dst, *src = [o.strip() for o in rest.split(",")]
        if op == "shr.u32":
            regs[dst] = val(src[0]) >> np.uint32(int(src[1]))
        elif op == "lop3.b32":
            regs[dst] = sbmm_asm._lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3]))
        elif op == "mov.b32":
            regs[dst] = val(src[0])
        elif op in ("sub.rn.f16x2", f"fma.rn.{dtype}x2"):  # bf16 "shift" expanders use fma by 1 too
            (a0, a1), (b0, b1) = halves(val(src[0])), halves(val(src[1]))
            if op.startswith("sub"):
                lo, hi = a0 - b0, a1 - b1
            else:
                c0, c1 = halves(val(src[2]))
                lo, hi = a0 * b0 + c0, a1 * b1 + c1  # exact in float64 for these operands: one rounding below
            regs[dst] = sbmm_asm._from_lanes(lo.astype(np.float32), hi.astype(np.float32), dtype)
        else:
            raise AssertionError(f"the interpreter has no {op!r}")
    return np.stack([np.stack(halves(regs[f"${p}"]), axis=-1) for p in range(outputs)], axis=1)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("expand", ["shift", "fma"])
@pytest.mark.parametrize("bits", [4, 2])
def test_expand_ptx_run_gives_code_minus_zero_for_every_pair(dtype, expand, bits):
    """Both word expanders of both kernels, their PTX interpreted, turn every code of a word into code - zero at
    the register the model (expand_word) says; "fma" with the shifts of FMA_SHIFTS (fewer than one per pair)."""
    g = np.random.default_rng(5)
    words = np.concatenate([g.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32),
                            np.array([0, 0xFFFFFFFF, 0xAAAAAAAA, 0x55555555], dtype=np.uint32)])
    module, regs = (sbmm_spmma, 4) if bits == 4 else (sbmm_spmma2, 8)
    ptx, constraints = module.expand_ptx(dtype, expand)
    assert constraints == ",".join(["=r"] * regs + ["r"])
    np.testing.assert_array_equal(run_expand_ptx(ptx, words, dtype, regs), expand_word(words, dtype, bits=bits))
    shifts = regs - 1 if expand == "shift" else len(set(sbmm_spmma.FMA_SHIFTS[bits][dtype]) - {0})
    assert ptx.count("shr.u32") == shifts
    with pytest.raises(ValueError, match="unknown word expander"):
        module.expand_ptx(dtype, "fast")


def mma_sp(a: np.ndarray, b: np.ndarray, meta: np.ndarray, c: np.ndarray, selector: int) -> np.ndarray:
    """mma.sp.m16n8k32 per the PTX ISA: a [32 lanes, 4 regs, 2] compressed A, b [32, 4, 2], meta uint32 [32],
    c [32, 4] -> d [32, 4]."""
    dense_a = np.zeros((16, 32))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg in range(4):
            row = g + 8 * (reg & 1)
            for e in range(2):
                col = 2 * t + e + 8 * (reg >> 1)  # compressed column: kept value col % 2 of group col // 2
                chunk = col // 8  # metadata: lane pair t = 2 * selector + chunk, row g+8 in the high half
                m = int(meta[4 * g + 2 * selector + chunk])
                idx = (m >> (16 * (row >= 8) + 2 * (col % 8))) & 0x3
                dense_a[row, 4 * (col // 2) + idx] += a[lane, reg, e]
    dense_b = np.zeros((32, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for reg in range(4):
            for e in range(2):
                dense_b[8 * reg + 2 * t + e, g] = b[lane, reg, e]
    prod = dense_a @ dense_b
    d = c.copy()
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            d[lane, i] += prod[g + 8 * (i >> 1), 2 * t + (i & 1)]
    return d


def kernel_tile(q_sp4, m_sp4, scales, x, block_row: int, dtype: str) -> np.ndarray:
    """What one warp of the kernel computes for 16-row block R = block_row and tokens 0..7: [16, 8]."""
    k = x.shape[1]
    qf = q_sp4.reshape(-1).numpy().view(np.uint32)
    mf = m_sp4.reshape(-1).numpy().view(np.uint32)
    xp = spmma_layout.sp4_x(x).double().numpy()  # as the wrapper hands it over: pairs in the sp4 B order
    rows = 16 * block_row + G
    acc = np.zeros((32, 4))
    for k0 in range(0, k, 128):
        words_at = (block_row // 4) * 4 * k + (block_row % 4) * 128 + 4 * k0 + 4 * LANES  # + j
        meta_at = (block_row // 4) * 2 * k + (block_row % 4) * 64 + 2 * k0 + 2 * LANES  # + slot
        part = np.zeros((32, 4))
        for j in range(4):
            a = expand_word(qf[words_at + j], dtype)
            pair = k0 // 2 + 16 * T[:, None] + 4 * j + np.arange(4)[None, :]  # [lane, reg m]: stored 16t + 4j + m
            b = np.stack([xp[G[:, None], 2 * pair], xp[G[:, None], 2 * pair + 1]], axis=-1)
            part = mma_sp(a, b, mf[meta_at + j // 2], part, selector=j % 2)
        group = k0 // (k // scales.shape[1])
        s = scales[:, group].float().numpy()
        acc += part * np.stack([s[rows], s[rows], s[rows + 8], s[rows + 8]], axis=1)
    out = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            out[G[lane] + 8 * (i >> 1), 2 * T[lane] + (i & 1)] = acc[lane, i]
    return out


def assert_model_matches_dense_product(bits, k, group, dtype, seed, pack, tile):
    """The mma.sp model on the registers a kernel loads from `pack`'s words (`tile`: the kernel's addressing, as
    kernel_tile) = x @ dequant(Δ).T for three 16-row blocks of a 128-row delta and 8 tokens."""
    n = 128
    gen = torch.Generator().manual_seed(seed)
    p = random_packed(n, k, bits, group, generator=gen)
    x = torch.randn(8, k, generator=gen).to(torch.float16 if dtype == "f16" else torch.bfloat16)
    q, m = pack(p["qweight"], p["meta"])
    dense = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k))  # fp32
    want = (x.double() @ dense.double().T).numpy()  # [8 tokens, N]
    for block_row in (0, 3, 5):
        got = tile(q, m, p["scales"], x, block_row, dtype)
        np.testing.assert_allclose(got.T, want[:, 16 * block_row:16 * block_row + 16], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("group", [None, 128])
def test_mma_sp_model_on_sp4_registers_matches_dense_product(dtype, group):
    assert_model_matches_dense_product(4, 256, group, dtype, 7, spmma_layout.pack_sp4, kernel_tile)


def test_sp4_x_puts_each_lanes_b_registers_side_by_side():
    """Column pair 16j + 4m + t of a 128-column step (mma j, B register m, quad position t) is stored at pair
    16t + 4j + m; steps stay in place; K not a multiple of 128 is refused."""
    x = torch.arange(3 * 256, dtype=torch.float32).reshape(3, 256)
    got = spmma_layout.sp4_x(x)
    for step in range(2):
        for j in range(4):
            for m in range(4):
                for t in range(4):
                    src, dst = 64 * step + 16 * j + 4 * m + t, 64 * step + 16 * t + 4 * j + m
                    assert torch.equal(got[:, 2 * dst:2 * dst + 2], x[:, 2 * src:2 * src + 2])
    with pytest.raises(ValueError, match="K % 128"):
        spmma_layout.sp4_x(torch.zeros(2, 64))


@pytest.mark.parametrize("step_pairs,halves", [(64, 1), (128, 2)])
def test_x_dense_addresses_read_what_sp4_x_would_have_placed(step_pairs, halves):
    """X_DENSE (both kernels, x read as given): register n of lane t reads dense pair 4n + t of each 64-pair half
    step (sp2: half n // 16, register n % 16), the pair the copy in the B order (sp4_x) holds at 16t + n, which
    the kernels read without X_DENSE. The kernels' address formulas, written out."""
    x = torch.arange(2 * 2 * 256, dtype=torch.float32).reshape(2, 512)
    pairs, ordered = x.view(2, 256, 2), spmma_layout.sp4_x(x).view(2, 256, 2)
    for step in range(256 // step_pairs):
        for t in range(4):
            for n in range(16 * halves):
                h, r = divmod(n, 16)
                dense = step * step_pairs + 64 * h + 4 * r + t  # sbmm_spmma(2).py, X_DENSE
                b_order = step * step_pairs + 64 * h + 16 * t + r  # sbmm_spmma(2).py, sp4_x copy
                assert torch.equal(pairs[:, dense], ordered[:, b_order])


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_expand_ptx_uses_the_modelled_constants(dtype):
    """The PTX text carries the magic / zero constants the model above uses (the model cannot run the PTX)."""
    ptx, constraints = sbmm_spmma.expand_ptx(dtype)
    magic, zero = sbmm_spmma.MAGIC[dtype]
    assert str(magic) in ptx and constraints == "=r,=r,=r,=r,r"
    assert ptx.count("lop3.b32") == 4 and ptx.count("shr.u32") == 3
    assert str(zero if dtype == "f16" else zero | 0x80008000) in ptx
    for sel in (0, 1):
        mma, cons = sbmm_spmma.mma_ptx(dtype, sel)
        assert mma.rstrip().endswith(f"$12, {sel};") and f"m16n8k32.row.col.f32.{dtype}.{dtype}.f32" in mma
        assert cons.count("r") == 9 and cons.count("f") == 8


# ---------------------------------------------------------------- GPU: the kernel itself (skipped without CUDA)

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): q/k/v/o, gate/up, down


def run_sparse_mma(bits, stack, x, y, starts, slots, n, k, config=None, segments_hint=None):
    """y after the sparse-MMA kernel on the sp4 (4-bit) or sp2 (2-bit) copy of the stack, and after the canonical
    torch reference."""
    y_kernel, y_ref = y.clone(), y.clone()
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(stack["qweight"], stack["meta"])
    sbmm.sbmm(x, y_kernel, q, m, stack["scales"], None, starts, slots, bits, config=config, sp4=bits == 4,
              sp2=bits == 2, segments_hint=segments_hint)
    reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                             starts.cpu(), slots.cpu())
    return y_kernel, y_ref


@gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("segments", ["one", "many", "empty", "odd"])
def test_spmma_matches_reference_gpu(bits, n, k, group, dtype, segments):
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, segments, "cuda", seed=4, pad_rows=3)
    y_kernel, y_ref = run_sparse_mma(bits, stack, x, y, starts, slots, n, k)
    tol = dict(TOL[dtype])
    tol["atol"] *= 3  # |y| grows with sqrt(K)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **tol)
    torch.testing.assert_close(y_kernel[-3:], y[-3:])  # rows outside every segment stay untouched


@gpu
@pytest.mark.parametrize("block_m", [8, 16, 32])
@pytest.mark.parametrize("block_n,num_warps", [(64, 2), (64, 4), (128, 4), (32, 2), (128, 2)])
@pytest.mark.parametrize("min_ctas", [0, 10**6])
@pytest.mark.parametrize("bits,k,group", [(4, 1408, 128), (2, 2816, 128), (2, 2816, 256), (2, 2816, None)])
def test_spmma_configs_and_split_k_gpu(block_m, block_n, num_warps, min_ctas, bits, k, group):
    """N: 64-row blocks but not 128; K: 11 steps (128 columns at 4-bit, 256 at 2-bit: uneven K splits)."""
    n = 576
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, torch.float16, "odd", "cuda", seed=5)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, min_ctas=min_ctas)
    y_kernel, y_ref = run_sparse_mma(bits, stack, x, y, starts, slots, n, k, config=cfg)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[torch.float16])


@gpu
@pytest.mark.parametrize("block_m,block_n", [(8, 64), (16, 128)])
@pytest.mark.parametrize("min_ctas", [0, 10**6])
@pytest.mark.parametrize("bits,k,group,dtype", [
    (4, 1408, 128, torch.float16), (4, 1536, 128, torch.float16), (4, 1408, None, torch.bfloat16),
    (4, 128, 128, torch.float16), (4, 256, None, torch.float16),
    (2, 2816, 128, torch.float16), (2, 3072, 256, torch.float16), (2, 2816, None, torch.bfloat16),
    (2, 256, 128, torch.float16), (2, 512, None, torch.float16)])
def test_sparse_mma_two_steps_in_flight_gpu(block_m, block_n, min_ctas, bits, k, group, dtype):
    """prefetch 2 (two K steps in flight): odd and even step counts (11 and 12 steps unsplit; min_ctas 10**6
    splits them into 2-step parts and a 1-step tail), one step, two steps; row scales, and groups of one step (128
    at 2-bit: a scale per half step) or two (256 at 2-bit)."""
    n = 512
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, "odd", "cuda", seed=6)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=2, min_ctas=min_ctas, prefetch=2)
    y_kernel, y_ref = run_sparse_mma(bits, stack, x, y, starts, slots, n, k, config=cfg)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])


@gpu
@pytest.mark.parametrize("bits,k", [(4, 512), (2, 1024)])
def test_spmma_segments_hint_and_padded_segments_gpu(bits, k):
    n = 128
    stack, x, y, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "empty", "cuda", seed=11,
                                           pad_rows=5)
    for min_ctas in (0, 10**6):
        cfg = dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, min_ctas=min_ctas)
        y_kernel, y_ref = run_sparse_mma(bits, stack, x, y, starts, slots, n, k, config=cfg, segments_hint=2)
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[torch.float16])


@gpu
@pytest.mark.parametrize("options", [{"x_dense": True}, {"pdl": True}, {"x_dense": True, "pdl": True},
                                     {"expand": "fma"}, {"expand": "fma", "x_dense": True}])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("bits,k,group,dtype", [(4, 1408, 128, torch.float16), (4, 1408, None, torch.bfloat16),
                                                (2, 2816, 128, torch.float16), (2, 2816, 256, torch.bfloat16)])
def test_sparse_mma_launch_options_gpu(options, prefetch, bits, k, group, dtype):
    """x_dense (x read as given: no sp4_x copy), pdl (programmatic dependent launch) and expand fma (the word
    expanders with fewer shifts, FMA_SHIFTS) against the reference,
    split and unsplit, at 8 and 16 rows per block; an x with an odd storage offset (not readable as pairs: the
    wrapper copies it) and one with a row stride past K (a column slice, read in place) too."""
    if options.get("pdl") and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    n = 512
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, "odd", "cuda", seed=7)
    for block_m in (8, 16):
        for min_ctas in (0, 10**6):
            cfg = dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=2, min_ctas=min_ctas, prefetch=prefetch, **options)
            y_kernel, y_ref = run_sparse_mma(bits, stack, x, y, starts, slots, n, k, config=cfg)
            torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])
    odd = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(x.shape)  # storage offset 1
    odd.copy_(x)
    wide = torch.empty(x.shape[0], k + 64, dtype=dtype, device="cuda")[:, 32:32 + k]  # a row stride past K
    wide.copy_(x)
    cfg = dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, prefetch=prefetch, **options)
    for x_in in (odd, wide):
        y_kernel, y_ref = run_sparse_mma(bits, stack, x_in, y, starts, slots, n, k, config=cfg)
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])


@gpu
@pytest.mark.parametrize("bits", [4, 2])
def test_launch_cache_matches_triton_launches_across_alignments_gpu(bits, monkeypatch):
    """sbmm.LaunchCache (repeated launches call the compiled kernel directly): bitwise the launches through
    JITFunction.run, with x and y at 16-byte-aligned and misaligned addresses in turn (a kernel compiled for
    aligned pointers must not serve a misaligned launch), split and unsplit, x read in place and copied."""
    n, k = 512, 1024
    stack, x, y0, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "odd", "cuda", seed=12)
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(stack["qweight"], stack["meta"])
    big_x = torch.empty(x.numel() + 2, dtype=x.dtype, device="cuda")
    shifted_x = big_x[2:].view(x.shape)  # 4 bytes past a 16-byte boundary: still whole pairs
    shifted_x.copy_(x)
    big_y = torch.empty(y0.numel() + 2, dtype=y0.dtype, device="cuda")
    cache = sbmm.LaunchCache()
    monkeypatch.setattr(sbmm, "_LAUNCHES", cache)
    for config in (dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, min_ctas=0, x_dense=True),
                   dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, min_ctas=10**6)):
        results = {}
        for fast in (False, True):
            monkeypatch.setattr(sbmm, "FAST_LAUNCH", fast)
            for name, x_in in (("aligned", x), ("shifted", shifted_x), ("aligned again", x), ("shifted again",
                                                                                              shifted_x)):
                y = big_y[2:].view(y0.shape) if "shifted" in name else y0.clone()
                y.copy_(y0)
                sbmm.sbmm(x_in, y, q, m, stack["scales"], None, starts, slots, bits, config=config, sp4=bits == 4,
                          sp2=bits == 2)
                results[fast, name] = y.clone()
        for name in ("aligned", "shifted", "aligned again", "shifted again"):
            torch.testing.assert_close(results[True, name], results[False, name], rtol=0, atol=0)
        y_ref = y0.clone()
        reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                                 starts.cpu(), slots.cpu())
        torch.testing.assert_close(results[True, "shifted"].float(), y_ref.float(), **TOL[torch.float16])
    assert len(cache) == 4  # (aligned, shifted) x two configs: the shifted launches got kernels of their own


@gpu
@pytest.mark.parametrize("bits", [4, 2])
def test_planned_launch_memo_matches_full_calls_gpu(bits, monkeypatch):
    """Planned eager calls (no config: what the worker makes) keep their checks, plan and launcher per shape
    (sbmm._PLANS, sbmm._LAUNCHERS): repeats on other stacks of the same shape, on x and y at misaligned addresses
    and with another workspace give bitwise what calls without the memo (FAST_LAUNCH off) give, misaligned calls
    get launchers of their own, and a call of another shape is checked again."""
    n, k = 512, 1024
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    cases = [make_case(n, k, bits, 128, True, torch.float16, "odd", "cuda", seed=s) for s in (21, 22)]
    _, x, y0, starts, slots = cases[0]
    packed = [pack(c[0]["qweight"], c[0]["meta"]) + (c[0]["scales"],) for c in cases]
    big_x = torch.empty(x.numel() + 2, dtype=x.dtype, device="cuda")
    shifted_x = big_x[2:].view(x.shape)  # 4 bytes past a 16-byte boundary: still whole pairs
    shifted_x.copy_(x)
    big_y = torch.empty(y0.numel() + 2, dtype=y0.dtype, device="cuda")
    monkeypatch.setattr(sbmm, "_LAUNCHES", sbmm.LaunchCache())
    monkeypatch.setattr(sbmm, "_PLANS", {})
    monkeypatch.setattr(sbmm, "_LAUNCHERS", {})
    calls = [(i, name, x_in) for i in (0, 1, 0) for name, x_in in (("aligned", x), ("shifted", shifted_x))]
    results = {}
    for fast in (False, True):
        monkeypatch.setattr(sbmm, "FAST_LAUNCH", fast)
        for j, (i, name, x_in) in enumerate(calls):
            y = big_y[2:].view(y0.shape) if name == "shifted" else y0.clone()
            y.copy_(y0)
            q, m, sc = packed[i]
            sbmm.sbmm(x_in, y, q, m, sc, None, starts, slots, bits, sp4=bits == 4, sp2=bits == 2,
                      workspace=sbmm.Workspace("cuda") if j % 2 else None)
            results[fast, j] = y.clone()
    for j in range(len(calls)):
        torch.testing.assert_close(results[True, j], results[False, j], rtol=0, atol=0)
    assert not torch.equal(results[True, 0], results[True, 2])  # the two stacks really differ
    assert len(sbmm._PLANS) == 1  # one shape (x shifted by 4 bytes keeps its strides and even offset)
    assert len(sbmm._LAUNCHERS) == 2  # aligned and shifted tensors: a launcher each
    with pytest.raises(ValueError):  # another shape is checked again, not served from the memo
        sbmm.sbmm(x[:, :512], y0[:, :256].contiguous(), *packed[0][:2], packed[0][2], None, starts, slots, bits,
                  sp4=bits == 4, sp2=bits == 2)


def test_launch_spec_is_at_least_as_fine_as_tritons():
    """sbmm._spec (the LaunchCache key of a runtime argument) separates what Triton specializes on: a tensor's
    16-byte alignment and dtype, an int's value 1, multiple of 16 and 32-bit range."""
    t = torch.zeros(8, dtype=torch.float16)
    assert sbmm._spec(t) != sbmm._spec(t[1:])
    assert sbmm._spec(t) != sbmm._spec(t.view(torch.int16))
    assert len({sbmm._spec(v) for v in (1, 16, 17, 2**31)}) == 4
    assert sbmm._spec(0) == sbmm._spec(32) == sbmm._spec(48) and sbmm._spec(3) == sbmm._spec(5)


@gpu
@pytest.mark.parametrize("bits", [4, 2])
def test_pdl_launches_in_sequence_and_in_a_graph_gpu(bits):
    """Back-to-back PDL launches on one y, with launches whose programs all exit early (no segment has a delta)
    in between, eager and captured in a CUDA graph: bitwise the results of plain launches (same arithmetic,
    same split order). A launch that exits early still waits for the one before it, or the launch after it could
    read y before the one before has written it."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    n, k = 1024, 2048
    stack, x, y0, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "many", "cuda", seed=8)
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(stack["qweight"], stack["meta"])
    none = torch.full_like(slots, -1)
    order = [slots, none, slots.flip(0), none, none, slots]

    def run(y, pdl, ws):
        for s in order:
            sbmm.sbmm(x, y, q, m, stack["scales"], None, starts, s, bits, sp4=bits == 4, sp2=bits == 2,
                      config=dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, min_ctas=10**6, pdl=pdl), workspace=ws)

    results = []
    for pdl in (False, True):
        ws = sbmm.Workspace(x.device)
        eager = y0.clone()
        run(eager, pdl, ws)
        captured = y0.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(captured, pdl, ws)
        graph.replay()
        torch.cuda.synchronize()
        results += [eager, captured]
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_sp4_path_rejects_what_it_cannot_run():
    """Off CUDA (or asymmetric, 2-bit, shapes that do not tile) the opt-in sp4 path raises instead of guessing."""
    stack, x, y, starts, slots = make_case(64, 128, 4, None, True, torch.float16, "one", "cpu")
    with pytest.raises(ValueError, match="sp4"):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 4, sp4=True)


class _FakeCompiled:
    """What LaunchCache needs of a compiled kernel: its launcher (recording each call) and launch metadata."""

    function, packed_metadata = "fn-handle", "packed"

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *call):
        self.calls.append(("direct", call))


class _FakeJit:
    """A JIT function stand-in: `fn[grid](*args, **kwargs)` records the call and returns one compiled kernel per
    distinct launch, as JITFunction.run does for a new specialization."""

    __name__ = "fake_kernel"

    def __init__(self, arg_names: list[str]) -> None:
        self.arg_names = arg_names
        self.calls: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.calls)
        return launch


def test_launch_cache_reuses_a_compiled_kernel_only_for_the_same_key(monkeypatch):
    """The first launch of a key goes through fn[grid] (JITFunction.run); the next one with the same constexprs,
    options and argument specialization calls the compiled launcher with the runtime args then the constexprs in
    signature order, on the current stream; another alignment or another constexpr key is a new first launch; a
    constexpr among the leading runtime parameters is refused."""
    monkeypatch.setattr(sbmm, "_current_stream", lambda index: 1234)
    fn = _FakeJit(["x_ptr", "n", "BLOCK", "MODE"])
    cache = sbmm.LaunchCache()
    dev = torch.device("cuda", 0)
    x = torch.zeros(64, dtype=torch.float16)
    consts = []

    def const():
        consts.append(1)
        return {"MODE": 3, "BLOCK": 64}

    cache.launch(fn, (2, 1, 1), (x, 128), ("key",), 4, False, dev, const)
    assert fn.calls[-1] == ("jit", (2, 1, 1), (x, 128), {"MODE": 3, "BLOCK": 64, "num_warps": 4, "launch_pdl": False})
    cache.launch(fn, (5, 1, 1), (x, 256), ("key",), 4, False, dev, const)  # 256: same class as 128
    assert fn.calls[-1] == ("direct", (5, 1, 1, 1234, "fn-handle", "packed", None, sbmm.knobs.runtime.launch_enter_hook,
                                       sbmm.knobs.runtime.launch_exit_hook, x, 256, 64, 3))
    assert consts == [1] and len(cache) == 1  # the constexprs were only built for the first launch
    cache.launch(fn, (5, 1, 1), (x[1:], 256), ("key",), 4, False, dev, const)  # misaligned x: its own kernel
    cache.launch(fn, (5, 1, 1), (x, 1), ("key",), 4, False, dev, const)  # n == 1: Triton specializes it
    cache.launch(fn, (5, 1, 1), (x, 256), ("other",), 4, False, dev, const)
    cache.launch(fn, (5, 1, 1), (x, 256), ("key",), 4, True, dev, const)  # another launch option
    assert [c[0] for c in fn.calls] == ["jit", "direct", "jit", "jit", "jit", "jit"] and len(cache) == 5
    bad = _FakeJit(["BLOCK", "x_ptr"])
    with pytest.raises(ValueError, match="constexpr"):
        cache.launch(bad, (1, 1, 1), (64, x), ("key",), 4, False, dev, lambda: {"BLOCK": 64})
    assert bad.calls == [] and len(cache) == 5  # refused before any launch
