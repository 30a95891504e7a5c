"""SBMM on the sparse tensor cores (Gluon): 4-bit symmetric 2:4 deltas in the sp4 order feed `mma.sp` directly.

Only the kept values are expanded (one `lop3` + one half2 `sub` per two values, three `shr` per word; the launch
option "expand": "fma" takes one `shr` for fp16, FMA_SHIFTS, not in the tables) and the 2:4 indices go to the MMA's
metadata register as stored: no placement at dense positions, no meta arithmetic.
Δ is the A operand (rows = MMA M), tokens the B operand; the K order is the dense order (no permutation).

mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}: PTX ISA "Matrix fragments for multiply-accumulate operation
with sparse matrix A" and "Sparse matrix storage" (docs.nvidia.com/cuda/parallel-thread-execution; the f16 A
layout for m16n8k32 is the dense m16n8k16 one: NVIDIA forum thread 204083; the metadata lanes as XLA's Triton
sparse-dot lowering loads them, `SparseLocalLoadToLLVM`, and LLVM's selector range for m16n8k32 f16/bf16, 0..1).
With g = lane >> 2, t = lane & 3:
  A (compressed 16 x 16, 4 b32): a0 row g, cols 2t, 2t+1; a1 row g+8, same; a2 row g, cols 2t+8, 2t+9; a3 row
     g+8, same. Compressed cols 2q, 2q+1 are the two kept values of K group q (K 4q .. 4q+3), so a lane holds
     whole groups t and t+4 of rows g and g+8, lower index in the low half.
  B (32 x 8, 4 b32): reg m holds K 8m + 2t, 8m + 2t + 1 of token column g.
  C/D (16 x 8 f32): c0, c1 row g, tokens 2t, 2t+1; c2, c3 row g+8.
  metadata (b32, selector sel in {0, 1}): lanes with t = 2sel + c supply it; bits [15:0] cover row g and bits
     [31:16] row g+8, K 16c .. 16c+15, two bits per kept value in compressed-column order: per group the
     nibble i0 | i1 << 2, exactly the canonical meta nibble (kernels/packing.py). The other lane pair's register
     is ignored, so instructions 0, 2 use selector 0 and 1, 3 selector 1: every lane's two loaded meta
     registers are used (kernels/spmma_layout.py `pack_sp4` stores them that way).
A K step is 128 columns = 4 instructions j; per 16-row block a lane loads 4 words (one per j, 16 bytes) and
2 meta words (8 bytes). B regs (K 32j + 8m + 2t: a group's 4 columns are split over two lanes) would be 16
four-byte loads of x in dense order, so the wrapper hands the kernel x in the sp4 B order (kernels/spmma_layout.py
`sp4_x`: a lane's 16 pairs of a step are contiguous, four 16-byte loads per token block); with X_DENSE the kernel
reads x as given instead, sixteen 4-byte loads, which at BLOCK_M 8 costs less than the copy's own launch (decode;
docs/kernels.md run 18). PDL: programmatic dependent launch (`gdc_wait`; docs/kernels.md run 18). With PREFETCH
the next step's words, meta and x are loaded before this step's MMAs (registers; the last step re-reads itself);
PREFETCH 2 keeps two steps in flight (two register buffers, each reloaded right after its MMAs: no moves that
would wait on a load). Scales (per row, or per group that is a multiple of 128 columns) multiply the fp32 product
of each step, like the dense2 RAW path.
"""

import numpy as np
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels.sbmm_gluon import _find_tile, _split_range
from kernels.sbmm_triton import SEGMENT_ARGS, SEGMENT_POINTERS

STEP_K = gl.constexpr(128)  # dense columns per K step (4 x mma.sp m16n8k32)
MAGIC = {"f16": (0x64006400, 0x64086408), "bf16": (0x43004300, 0x43084308)}  # (1024 | 128) + code, + zero 8
MAGIC_VALUE = {"f16": 1024.0, "bf16": 128.0}  # what MAGIC's half is
# The "fma" expanders (launch config "expand": "fma"): the right shift of pair p (bits p * bits and p * bits + 16)
# before its lop3. A code at field e (bits e * bits) of a half lies inside the magic's mantissa while
# (e + 1) * bits <= 10 (bf16: 7), so it is masked in place as magic + q 2^(e bits), and one fma by 2^(-e bits) minus
# (magic 2^(-e bits) + zero) gives q - zero, exact; shifts bring the other pairs into that range. Pair p's shift:
FMA_SHIFTS = {4: {"f16": (0, 0, 8, 8), "bf16": (0, 4, 8, 12)},  # sp4: 1 shr a word for fp16 (bf16: 3, as before)
              2: {"f16": (0, 0, 0, 0, 0, 10, 10, 10), "bf16": (0, 0, 0, 6, 6, 6, 12, 12)}}  # sp2: 1 (bf16 2), was 7


def expand_ptx(dtype: str, expand: str = "shift") -> tuple[str, str]:
    """(PTX, constraints): one sp4 word -> the 4 half2 A registers a0..a3 of its mma.sp, unscaled code - 8.
    expand: "shift" (a shift per pair, then lop3 and a half2 sub) or "fma" (FMA_SHIFTS)."""
    if expand == "fma":
        return fma_expand_ptx(dtype, 4, 8)
    if expand != "shift":
        raise ValueError(f"unknown word expander {expand!r}; valid: shift, fma")
    magic, zero = MAGIC[dtype]
    lines = ["{", ".reg .b32 %s<4>, %c<4>, %z, %one;"]
    lines += [f"shr.u32 %s{p}, $4, {4 * p};" for p in (1, 2, 3)]
    lines += [f"lop3.b32 %c{p}, {'$4' if p == 0 else f'%s{p}'}, {0x000F000F}, {magic}, 234;" for p in range(4)]
    if dtype == "f16":
        lines.append(f"mov.b32 %z, {zero};")
        lines += [f"sub.rn.f16x2 ${p}, %c{p}, %z;" for p in range(4)]
    else:  # fma (sm_80) rather than sub.bf16x2 (sm_90): (128 + q) * 1 - 136, exact
        lines += [f"mov.b32 %z, {zero | 0x80008000};", "mov.b32 %one, 1065369472;"]
        lines += [f"fma.rn.bf16x2 ${p}, %c{p}, %one, %z;" for p in range(4)]
    lines.append("}")
    return "\n".join(lines), "=r,=r,=r,=r,r"


def fma_expand_ptx(dtype: str, bits: int, zero: int) -> tuple[str, str]:
    """(PTX, constraints): the "fma" expander of one word of `bits`-bit codes (FMA_SHIFTS) -> 32 // (2 bits) half2
    registers, code - zero."""
    shifts, regs, word = FMA_SHIFTS[bits][dtype], 32 // (2 * bits), f"${32 // (2 * bits)}"
    mask, magic, step = (1 << bits) - 1, MAGIC[dtype][0], float(1 << bits)
    lines = ["{", f".reg .b32 %s<3>, %c<{regs}>, %m<{regs}>, %b<{regs}>;"]
    source = {0: word}
    for i, shift in enumerate(sorted(set(shifts) - {0})):
        lines.append(f"shr.u32 %s{i}, {word}, {shift};")
        source[shift] = f"%s{i}"
    fields = [p - shifts[p] // bits for p in range(regs)]  # pair p sits at field e of its source
    lines += [f"lop3.b32 %c{p}, {source[shifts[p]]}, {(mask | mask << 16) << bits * e}, {magic}, 234;"
              for p, e in enumerate(fields)]
    for e in sorted(set(fields)):
        lines.append(f"mov.b32 %m{e}, {half2_bits(dtype, step ** -e)};")
        lines.append(f"mov.b32 %b{e}, {half2_bits(dtype, -(MAGIC_VALUE[dtype] * step ** -e + zero))};")
    lines += [f"fma.rn.{dtype}x2 ${p}, %c{p}, %m{e}, %b{e};" for p, e in enumerate(fields)]
    lines.append("}")
    return "\n".join(lines), ",".join(["=r"] * regs + ["r"])


def half2_bits(dtype: str, value: float) -> int:
    """The 32-bit pattern of (value, value) as fp16 / bf16; the value must be exact there (the fma expanders')."""
    if dtype == "f16":
        assert float(np.float16(value)) == value, f"{value} is not exact in fp16"
        half = int(np.float16(value).view(np.uint16))
    else:
        bits32 = int(np.float32(value).view(np.uint32))
        assert bits32 & 0xFFFF == 0, f"{value} is not exact in bf16"
        half = bits32 >> 16
    return half * 0x00010001


def mma_ptx(dtype: str, selector: int) -> tuple[str, str]:
    """(PTX, constraints): D = A_sparse (a0..a3, meta) @ B (b0..b3) + C, inputs a, b, meta, c."""
    ptx = (f"mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{dtype}.{dtype}.f32 "
           "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9, $10, $11}, {$13, $14, $15, $16}, $12, " f"{selector};")
    return ptx, ",".join(["=f"] * 4 + ["r"] * 9 + ["f"] * 4)


@gluon.jit
def _pick(v, idx: gl.constexpr, NUM: gl.constexpr):
    """Element idx of the last dim (size NUM, in registers) of v, that dim dropped; registers only."""
    lo, hi = gl.split(gl.reshape(v, [v.shape[0], v.shape[1], NUM // 2, 2]))
    half = lo if idx % 2 == 0 else hi
    if NUM == 2:
        return gl.reshape(half, [v.shape[0], v.shape[1]])
    else:
        return _pick(half, idx // 2, NUM // 2)


@gluon.jit
def _mma_step(acc, xb, qw, mw, EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
              CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr):
    """acc (4 fp32 [RB, TB, 32]) += the 4 mma.sp of one K step."""
    c0, c1, c2, c3 = acc
    for j in gl.static_range(4):
        w = gl.convert_layout(_pick(qw, j, 4), L_A, assert_trivial=True)
        a0, a1, a2, a3 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 4,
                                                   is_pure=True, pack=1)
        meta = gl.expand_dims(gl.convert_layout(_pick(mw, j // 2, 2), L_A, assert_trivial=True), 1)
        b0 = gl.expand_dims(gl.convert_layout(_pick(xb, 4 * j, 16), L_B, assert_trivial=True), 0)
        b1 = gl.expand_dims(gl.convert_layout(_pick(xb, 4 * j + 1, 16), L_B, assert_trivial=True), 0)
        b2 = gl.expand_dims(gl.convert_layout(_pick(xb, 4 * j + 2, 16), L_B, assert_trivial=True), 0)
        b3 = gl.expand_dims(gl.convert_layout(_pick(xb, 4 * j + 3, 16), L_B, assert_trivial=True), 0)
        args = [gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1), gl.expand_dims(a3, 1),
                b0, b1, b2, b3, meta, c0, c1, c2, c3]
        if j % 2 == 0:
            c0, c1, c2, c3 = gl.inline_asm_elementwise(MMA0, CONSTRAINTS_M, args, dtype=(gl.float32,) * 4,
                                                       is_pure=True, pack=1)
        else:
            c0, c1, c2, c3 = gl.inline_asm_elementwise(MMA1, CONSTRAINTS_M, args, dtype=(gl.float32,) * 4,
                                                       is_pure=True, pack=1)
    return c0, c1, c2, c3


@gluon.jit
def _scale_rows(scales_ptr, slot64, stride_ss, stride_sn, n0, RB: gl.constexpr, L_A: gl.constexpr):
    """Pointers to the scales of rows g and g + 8 of each 16-row block of this program: [RB, 32] each."""
    rb_a = gl.arange(0, RB, layout=gl.SliceLayout(1, L_A))
    lane_a = gl.arange(0, 32, layout=gl.SliceLayout(0, L_A))
    rows_a = n0 + 16 * rb_a[:, None] + lane_a[None, :] // 4
    scale_lo = scales_ptr + slot64 * stride_ss + rows_a * stride_sn
    return scale_lo, scale_lo + 8 * stride_sn


@gluon.jit
def _load_step(x_rows, qw_tile, meta_tile, k0, WORDS_PER_COL2: gl.constexpr):
    """One K step's x pairs, words and meta words at dense column k0 (words: WORDS_PER_COL2 / 2 per column)."""
    return gl.load(x_rows + k0 // 2), gl.load(qw_tile + WORDS_PER_COL2 * k0), gl.load(meta_tile + 2 * k0)


@gluon.jit
def _load_delta(qw_tile, meta_tile, k0, WORDS_PER_COL2: gl.constexpr):
    """One K step's words and meta words (what `_load_step` loads besides x)."""
    return gl.load(qw_tile + WORDS_PER_COL2 * k0), gl.load(meta_tile + 2 * k0)


@gluon.jit
def gdc_wait():
    """griddepcontrol.wait: block until the grids this launch depends on (programmatic dependent launch) have
    finished and their writes are visible; a no-op in a launch without PDL."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gdc_launch_dependents():
    """griddepcontrol.launch_dependents: the next PDL launch on the stream may start once every program of this
    one has run this (or exited); a no-op otherwise."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _scaled(acc, part, s_lo, s_hi):
    """acc + part * scale, c0/c1 on row g, c2/c3 on row g + 8 (s_lo / s_hi: fp32 [RB, 1, 32])."""
    return (acc[0] + part[0] * s_lo, acc[1] + part[1] * s_lo, acc[2] + part[2] * s_hi, acc[3] + part[3] * s_hi)


@gluon.jit
def _k_step(acc, zero, xb, qw, mw, k0, scale_lo, scale_hi, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr,
            HALF_SCALES: gl.constexpr, EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
            CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr):
    """acc + one K step at dense column k0 (group scales on this step's fp32 product; row scales come after).
    HALF_SCALES: the sp2 step's flag, never set here (groups are whole 128-column steps)."""
    if SCALE_MODE == 1:  # one scale per row and step: on this step's fp32 product
        part = _mma_step((zero, zero, zero, zero), xb, qw, mw, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M,
                         L_A, L_B)
        s_lo = gl.expand_dims(gl.load(scale_lo + k0 // GROUP_SIZE).to(gl.float32), 1)
        s_hi = gl.expand_dims(gl.load(scale_hi + k0 // GROUP_SIZE).to(gl.float32), 1)
        return _scaled(acc, part, s_lo, s_hi)
    else:
        return _mma_step(acc, xb, qw, mw, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)


@gluon.jit
def _k_loop(acc, zero, x_rows, qw_tile, meta_tile, k_lo, k_hi, scale_lo, scale_hi, K_STEP: gl.constexpr,
            STEP: gl.constexpr, WORDS_PER_COL2: gl.constexpr, PREFETCH: gl.constexpr, GROUP_SIZE: gl.constexpr,
            SCALE_MODE: gl.constexpr, HALF_SCALES: gl.constexpr, EXPAND: gl.constexpr, MMA0: gl.constexpr,
            MMA1: gl.constexpr, CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, L_A: gl.constexpr,
            L_B: gl.constexpr, PDL: gl.constexpr):
    """acc + the K steps k_lo..k_hi (STEP columns each) of both sparse-MMA kernels; K_STEP is the kernel's step
    (this module's `_k_step`, or kernels/sbmm_spmma2.py's). PREFETCH 0: each step's loads, then its MMAs; 1: the
    next step's loads in flight during this step's MMAs (the last step re-reads itself); 2: two steps in flight,
    buffers a and b, each reloaded two steps ahead right after its MMAs, so no register move waits on a load.
    PDL: the launch is a programmatic dependent one; the prefetched deltas are loaded before `gdc_wait`, x (which
    the previous launch may write) only after it."""
    if PREFETCH == 2:
        last = k_hi - STEP
        if PDL:  # the deltas of the first two steps before the wait (no earlier launch writes them), x after
            qa, ma = _load_delta(qw_tile, meta_tile, k_lo, WORDS_PER_COL2)
            qw, mw = _load_delta(qw_tile, meta_tile, gl.minimum(k_lo + STEP, last), WORDS_PER_COL2)
            gdc_wait()
            xa = gl.load(x_rows + k_lo // 2)
            xb = gl.load(x_rows + gl.minimum(k_lo + STEP, last) // 2)
        else:
            xa, qa, ma = _load_step(x_rows, qw_tile, meta_tile, k_lo, WORDS_PER_COL2)
            xb, qw, mw = _load_step(x_rows, qw_tile, meta_tile, gl.minimum(k_lo + STEP, last), WORDS_PER_COL2)
        for k0 in range(k_lo, last, 2 * STEP):  # whole pairs of steps (a trailing odd step below)
            acc = K_STEP(acc, zero, xa, qa, ma, k0, scale_lo, scale_hi, GROUP_SIZE, SCALE_MODE, HALF_SCALES, EXPAND,
                         MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
            xa, qa, ma = _load_step(x_rows, qw_tile, meta_tile, gl.minimum(k0 + 2 * STEP, last), WORDS_PER_COL2)
            acc = K_STEP(acc, zero, xb, qw, mw, k0 + STEP, scale_lo, scale_hi, GROUP_SIZE, SCALE_MODE, HALF_SCALES,
                         EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
            xb, qw, mw = _load_step(x_rows, qw_tile, meta_tile, gl.minimum(k0 + 3 * STEP, last), WORDS_PER_COL2)
        if ((k_hi - k_lo) // STEP) % 2 == 1:  # buffer a holds the last step
            acc = K_STEP(acc, zero, xa, qa, ma, last, scale_lo, scale_hi, GROUP_SIZE, SCALE_MODE, HALF_SCALES, EXPAND,
                         MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
    else:
        if PREFETCH:
            if PDL:
                qw, mw = _load_delta(qw_tile, meta_tile, k_lo, WORDS_PER_COL2)
                gdc_wait()
                xb = gl.load(x_rows + k_lo // 2)
            else:
                xb, qw, mw = _load_step(x_rows, qw_tile, meta_tile, k_lo, WORDS_PER_COL2)
        elif PDL:
            gdc_wait()
        for k0 in range(k_lo, k_hi, STEP):
            if PREFETCH:
                xb_n, qw_n, mw_n = _load_step(x_rows, qw_tile, meta_tile, gl.minimum(k0 + STEP, k_hi - STEP),
                                              WORDS_PER_COL2)
            else:
                xb, qw, mw = _load_step(x_rows, qw_tile, meta_tile, k0, WORDS_PER_COL2)
            acc = K_STEP(acc, zero, xb, qw, mw, k0, scale_lo, scale_hi, GROUP_SIZE, SCALE_MODE, HALF_SCALES, EXPAND,
                         MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
            if PREFETCH:
                xb, qw, mw = xb_n, qw_n, mw_n
    return acc


@gluon.jit
def _sp4_tiles(qw_ptr, meta_ptr, n0, K: gl.constexpr, RB: gl.constexpr, L_W: gl.constexpr, L_META: gl.constexpr):
    """A lane's sp4 word pointers [RB, 32, 4] and meta word pointers [RB, 32, 2] at K step 0 of the 16-row blocks
    R = n0 / 16 + rb of one slot (kernels/spmma_layout.py pack_sp4): words at (R // 4) * 4K + (R % 4) * 128 +
    lane * 4 + j, meta at (R // 4) * 2K + (R % 4) * 64 + lane * 2 + half; dense column k0 adds 4 * k0 words and
    2 * k0 meta words."""
    rb_w = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_W)))
    lane_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_W)))
    j_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_W)))
    qw_tile = (qw_ptr + ((rb_w // 4) * (4 * K) + (rb_w % 4) * 128)[:, None, None]
               + (lane_w * 4)[None, :, None] + j_w[None, None, :])
    rb_m = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_META)))
    lane_m = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_META)))
    s_m = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_META)))
    meta_tile = (meta_ptr + ((rb_m // 4) * (2 * K) + (rb_m % 4) * 64)[:, None, None]
                 + (lane_m * 2)[None, :, None] + s_m[None, None, :])
    return qw_tile, meta_tile


@gluon.jit(do_not_specialize=SEGMENT_ARGS, do_not_specialize_on_alignment=SEGMENT_POINTERS)
def _sbmm_spmma_kernel(
    # activations as fp16/bf16 pairs in the sp4 B order (kernels/spmma_layout.py sp4_x): int32 [T, K/2]; y: [T, N]
    x_ptr, y_ptr, stride_xm, stride_ym,
    # slot-stacked sp4 words and meta (kernels/spmma_layout.py pack_sp4), scales fp16 [slots, N, G]
    qw_ptr, meta_ptr, scales_ptr, stride_qs, stride_ms, stride_ss, stride_sn,
    # segments: rows seg_starts[s]:seg_starts[s+1] use slot seg_slots[s] (-1: none)
    seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
    # split-K (SPLIT_K > 1): fp32 partials ws [SPLIT_K, T, N], one arrival counter per output tile (zeroed)
    ws_ptr, counters_ptr, stride_wss,
    N, K: gl.constexpr, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MAX_SEGS: gl.constexpr,
    EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
    CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
    L_S: gl.constexpr, L_W: gl.constexpr, L_META: gl.constexpr, L_X: gl.constexpr, L_SEG: gl.constexpr,
    SPLIT_K: gl.constexpr, PREFETCH: gl.constexpr, PDL: gl.constexpr = False, X_DENSE: gl.constexpr = False,
):
    RB: gl.constexpr = BLOCK_N // 16
    TB: gl.constexpr = BLOCK_M // 8
    L_A: gl.constexpr = gl.SliceLayout(1, L_S)  # [RB, 32]: per 16-row block and lane
    L_B: gl.constexpr = gl.SliceLayout(0, L_S)  # [TB, 32]: per 8-token block and lane

    m_start, m_end, slot = _find_tile(gl.program_id(1), seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
                                      BLOCK_M, MAX_SEGS, L_SEG)
    if PDL:  # the next launch may start its own prologue (and delta loads) once all of this one is running
        gdc_launch_dependents()
    if m_end <= m_start:
        if PDL:  # exit only after the launch this one depends on: a launch after this one relies on it
            gdc_wait()
        return
    n0 = gl.program_id(0) * BLOCK_N
    pid_k = gl.program_id(2)
    k_lo, k_hi = _split_range(K, STEP_K, SPLIT_K)
    slot64 = slot.to(gl.int64)
    qw_tile, meta_tile = _sp4_tiles(qw_ptr + slot64 * stride_qs, meta_ptr + slot64 * stride_ms, n0, K, RB, L_W, L_META)
    # x pairs: token 8tb + g (rows past the tile re-read its last row, never stored), pair k/2 = 16j + 4m + t of
    # the step, stored (sp4_x) at 16t + 4j + m: register n = 4j + m of lane t is pair 16t + n
    tb_x = gl.arange(0, TB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_X)))
    lane_x = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_X)))
    n_x = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_X)))
    tok_x = gl.minimum(m_start + 8 * tb_x[:, None] + lane_x[None, :] // 4, m_end - 1)
    if X_DENSE:  # x as given: pair 4n + t of the step, one 4-byte load per register (no sp4_x copy)
        x_rows = x_ptr + (tok_x * stride_xm + lane_x[None, :] % 4)[:, :, None] + 4 * n_x[None, None, :]
    else:
        x_rows = x_ptr + (tok_x * stride_xm + 16 * (lane_x[None, :] % 4))[:, :, None] + n_x[None, None, :]
    scale_lo, scale_hi = _scale_rows(scales_ptr, slot64, stride_ss, stride_sn, n0, RB, L_A)

    zero = gl.zeros([RB, TB, 32], gl.float32, layout=L_S)
    acc = (zero, zero, zero, zero)
    acc = _k_loop(acc, zero, x_rows, qw_tile, meta_tile, k_lo, k_hi, scale_lo, scale_hi, _k_step, STEP_K, 4,
                  PREFETCH, GROUP_SIZE, SCALE_MODE, False, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B,
                  PDL)
    if SCALE_MODE == 0:  # one scale per row: applied once
        s_lo = gl.expand_dims(gl.load(scale_lo).to(gl.float32), 1)
        s_hi = gl.expand_dims(gl.load(scale_hi).to(gl.float32), 1)
        acc = _scaled((zero, zero, zero, zero), acc, s_lo, s_hi)
    _epilogue(acc, y_ptr, stride_ym, ws_ptr, counters_ptr, stride_wss, N, n0, m_start, m_end, pid_k, TB, RB, L_S,
              SPLIT_K)


@gluon.jit
def _epilogue(acc, y_ptr, stride_ym, ws_ptr, counters_ptr, stride_wss, N, n0, m_start, m_end, pid_k,
              TB: gl.constexpr, RB: gl.constexpr, L_S: gl.constexpr, SPLIT_K: gl.constexpr):
    """y[tokens, rows] += acc; acc[i] is row 16rb + g + 8 * (i // 2), token 8tb + 2t + i % 2. Split-K: every
    split stores its fp32 partial, the last to arrive adds all in split order (as kernels/sbmm_gluon.py) and sets
    the tile's counter back to zero, so a reused counter buffer (sbmm.Workspace) needs no memset."""
    rb = gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_S)))
    tb = gl.arange(0, TB, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_S)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_S)))
    rows = n0 + 16 * rb[:, None, None] + lane[None, None, :] // 4
    toks = m_start + 8 * tb[None, :, None] + 2 * (lane[None, None, :] % 4)
    y0 = y_ptr + toks * stride_ym + rows
    w0 = ws_ptr + toks * N + rows
    live = (toks < m_end) & (rows < N)
    live1 = (toks + 1 < m_end) & (rows < N)
    if SPLIT_K == 1:
        _add_to(y0, acc[0], live)
        _add_to(y0 + stride_ym, acc[1], live1)
        _add_to(y0 + 8, acc[2], live)
        _add_to(y0 + stride_ym + 8, acc[3], live1)
    else:
        gl.store(w0 + pid_k * stride_wss, acc[0], mask=live)
        gl.store(w0 + N + pid_k * stride_wss, acc[1], mask=live1)
        gl.store(w0 + 8 + pid_k * stride_wss, acc[2], mask=live)
        gl.store(w0 + N + 8 + pid_k * stride_wss, acc[3], mask=live1)
        gl.thread_barrier()
        tile = gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
        arrived = gl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            gl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")  # left zeroed for the next launch
            _add_to(y0, _sum_splits(w0, stride_wss, live, SPLIT_K), live)
            _add_to(y0 + stride_ym, _sum_splits(w0 + N, stride_wss, live1, SPLIT_K), live1)
            _add_to(y0 + 8, _sum_splits(w0 + 8, stride_wss, live, SPLIT_K), live)
            _add_to(y0 + stride_ym + 8, _sum_splits(w0 + N + 8, stride_wss, live1, SPLIT_K), live1)


@gluon.jit
def _sum_splits(ws, stride_wss, mask, SPLIT_K: gl.constexpr):
    total = gl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
    for s in gl.static_range(1, SPLIT_K):
        total += gl.load(ws + s * stride_wss, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@gluon.jit
def _add_to(ptrs, value, mask):
    y = gl.load(ptrs, mask=mask, other=0.0)
    gl.store(ptrs, (y.to(gl.float32) + value).to(ptrs.dtype.element_ty), mask=mask)


def _linear(regs: list, lane_dim: int, warps: list, shape: list[int]) -> gl.DistributedLinearLayout:
    """A layout whose 32 lanes walk dim `lane_dim` (size 32) and whose warps / registers are the given bases."""
    rank = len(shape)
    lane = [[(1 << i) if d == lane_dim else 0 for d in range(rank)] for i in range(5)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lane, warp_bases=warps, block_bases=[],
                                      shape=shape)


def _bits(n: int) -> int:
    return n.bit_length() - 1


def layouts(block_n: int, block_m: int, num_warps: int) -> dict:
    """L_S [RB, TB, 32] (one element per lane per MMA tile), and the load layouts L_W [RB, 32, 4] words,
    L_META [RB, 32, 2], L_X [TB, 32, 16] x pairs whose picked slices are L_S's slices. Warps take 16-row
    blocks rb = warp + num_warps * r; every warp reads all of x."""
    rb, tb = block_n // 16, block_m // 8
    assert rb % num_warps == 0 and block_m % 8 == 0, "BLOCK_N must be a multiple of 16 * num_warps, BLOCK_M of 8"
    rb_regs = [[num_warps << i] for i in range(_bits(rb // num_warps))]
    warps = [[1 << i] for i in range(_bits(num_warps))]
    lay_s = _linear([[0, 1 << i, 0] for i in range(_bits(tb))] + [r + [0, 0] for r in rb_regs], 2,
                    [w + [0, 0] for w in warps], [rb, tb, 32])
    lay_w = _linear([[0, 0, 1], [0, 0, 2]] + [r + [0, 0] for r in rb_regs], 1, [w + [0, 0] for w in warps],
                    [rb, 32, 4])
    lay_m = _linear([[0, 0, 1]] + [r + [0, 0] for r in rb_regs], 1, [w + [0, 0] for w in warps], [rb, 32, 2])
    lay_x = _linear([[0, 0, 1 << i] for i in range(4)] + [[1 << i, 0, 0] for i in range(_bits(tb))], 1,
                    [[0, 0, 0] for _ in warps], [tb, 32, 16])
    return dict(L_S=lay_s, L_W=lay_w, L_META=lay_m, L_X=lay_x)
