"""Dense Δ rows from sp4 / sp2 slot words on the sparse tensor cores (Gluon): the dequantization of the prefill path.

A segment of hundreds of rows on one delta costs the SBMM kernels one expansion of every delta word per 16 rows
(docs/kernels.md run 20: a prefill launch ~2.6x the base GEMM of its shape). Past a row count it is cheaper to
expand the delta once into a dense fp16/bf16 buffer and let cuBLAS multiply (kernels/delta_linear.py,
`dense_rows` in kernels/sbmm_configs.json).

The expansion is the SBMM kernels' own: a word's kept codes become the A registers of one `mma.sp` (sp2: of two)
and the meta words its metadata, as stored (kernels/sbmm_spmma.py has the fragment rules). The MMA then multiplies
by a selection matrix, B = E_c with B[k, n] = 1 where k = 8c + n, so D[:, n] = A[:, 8c + n]: four mma.sp give the
instruction's 16 x 32 block of Δ at its dense positions, the tensor core doing the 2:4 placement. Instruction j of a
K step covers the step's dense columns 32j .. 32j + 31 in both orders. A lane's B register m holds K 8m + 2t,
8m + 2t + 1 of column g (g = lane >> 2, t = lane & 3), so only register c is non-zero: 1.0 in its low half where
2t = g and in its high half where 2t + 1 = g. D (row g: columns 2t, 2t + 1 of the eight; row g + 8: the same) is
scaled in fp32 (per row, or by the group of its 32 columns), rounded to fp16/bf16 and stored as one 4-byte pair.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels.sbmm_spmma import _pick

ONE = {"f16": 0x3C00, "bf16": 0x3F80}  # 1.0 as a 16-bit pattern


def cvt_ptx(dtype: str) -> tuple[str, str]:
    """(PTX, constraints): two fp32 -> one fp16x2 / bf16x2 register, the first in the low half (round to nearest)."""
    return f"cvt.rn.{dtype}x2.f32 $0, $2, $1;", "=r,f,f"


@gluon.jit
def _sel(b, zero, m: gl.constexpr, c: gl.constexpr):
    """B register m of the selection E_c: b where m == c, else zeros."""
    if m == c:
        return b
    else:
        return zero


@gluon.jit
def _store_instr(a0, a1, a2, a3, meta, sel, zero_b, zero, out_lo, out_hi, col, s_lo, s_hi, MMA: gl.constexpr,
                 CVT: gl.constexpr, CONSTRAINTS_M: gl.constexpr, CONSTRAINTS_C: gl.constexpr):
    """Δ columns col .. col + 31 of rows g and g + 8 (one mma.sp's A and meta) to out: four selection MMAs."""
    for c in gl.static_range(4):
        args = [a0, a1, a2, a3, _sel(sel, zero_b, 0, c), _sel(sel, zero_b, 1, c), _sel(sel, zero_b, 2, c),
                _sel(sel, zero_b, 3, c), meta, zero, zero, zero, zero]
        d0, d1, d2, d3 = gl.inline_asm_elementwise(MMA, CONSTRAINTS_M, args, dtype=(gl.float32,) * 4, is_pure=True,
                                                   pack=1)
        lo = gl.inline_asm_elementwise(CVT, CONSTRAINTS_C, [d0 * s_lo, d1 * s_lo], dtype=gl.int32, is_pure=True,
                                       pack=1)
        hi = gl.inline_asm_elementwise(CVT, CONSTRAINTS_C, [d2 * s_hi, d3 * s_hi], dtype=gl.int32, is_pure=True,
                                       pack=1)
        gl.store(out_lo + (col + 8 * c) // 2, lo)
        gl.store(out_hi + (col + 8 * c) // 2, hi)


@gluon.jit
def _dequant_kernel(
    # one slot's sp4 / sp2 words and meta (any leading slot offset applied), scales fp16 [N, G]
    qw_ptr, meta_ptr, scales_ptr, stride_sn,
    # out: int32 view [rows, K / 2] of fp16/bf16 [rows, K]: Δ rows row0 .. row0 + rows
    out_ptr, stride_o, row0,
    K: gl.constexpr, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr, SP2: gl.constexpr,
    BLOCK_N: gl.constexpr, STEPS: gl.constexpr, ONE_BITS: gl.constexpr,
    EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr, CVT: gl.constexpr,
    CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, CONSTRAINTS_C: gl.constexpr,
    L_S: gl.constexpr, L_W: gl.constexpr, L_META: gl.constexpr,
):
    RB: gl.constexpr = BLOCK_N // 16
    STEP: gl.constexpr = 256 if SP2 else 128  # dense columns per K step of the order
    L_A: gl.constexpr = gl.SliceLayout(1, L_S)  # [RB, 32]: per 16-row block and lane
    L_B: gl.constexpr = gl.SliceLayout(0, L_S)  # [1, 32]
    n0 = row0 + gl.program_id(0) * BLOCK_N
    k_lo = gl.program_id(1) * (STEPS * STEP)
    # words (and sp2 meta): 16-row block R = n0 / 16 + rb, as the SBMM kernels address them
    rb_w = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_W)))
    lane_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_W)))
    u_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_W)))
    if SP2:
        tile_at = (((rb_w // 4) * (2 * K) + (rb_w % 4) * 128)[:, None, None] + (lane_w * 4)[None, :, None]
                   + u_w[None, None, :])
        qw_tile = qw_ptr + tile_at
        meta_tile = meta_ptr + tile_at
    else:
        qw_tile = (qw_ptr + ((rb_w // 4) * (4 * K) + (rb_w % 4) * 128)[:, None, None] + (lane_w * 4)[None, :, None]
                   + u_w[None, None, :])
        rb_m = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_META)))
        lane_m = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_META)))
        s_m = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_META)))
        meta_tile = (meta_ptr + ((rb_m // 4) * (2 * K) + (rb_m % 4) * 64)[:, None, None]
                     + (lane_m * 2)[None, :, None] + s_m[None, None, :])
    # out and scales: row g of each 16-row block (row g + 8: + 8 rows), column pair t
    rb_a = gl.arange(0, RB, layout=gl.SliceLayout(1, L_A))
    lane_a = gl.arange(0, 32, layout=gl.SliceLayout(0, L_A))
    rows = n0 + 16 * rb_a[:, None] + lane_a[None, :] // 4
    out_lo = gl.expand_dims(out_ptr + (rows - row0) * stride_o + lane_a[None, :] % 4, 1)
    out_hi = out_lo + 8 * stride_o
    scale_lo = scales_ptr + rows * stride_sn
    scale_hi = scale_lo + 8 * stride_sn
    # the selection's non-zero B register
    lane_b = gl.arange(0, 32, layout=gl.SliceLayout(0, L_B))
    g_b, t_b = lane_b // 4, lane_b % 4
    sel = gl.where(g_b == 2 * t_b, ONE_BITS, 0) | gl.where(g_b == 2 * t_b + 1, ONE_BITS << 16, 0)
    sel = gl.expand_dims(gl.expand_dims(sel, 0), 0)
    zero_b = gl.zeros_like(sel)
    zero = gl.zeros([RB, 1, 32], gl.float32, layout=L_S)
    if SCALE_MODE == 0:
        s_lo = gl.expand_dims(gl.load(scale_lo).to(gl.float32), 1)
        s_hi = gl.expand_dims(gl.load(scale_hi).to(gl.float32), 1)
    for s in range(STEPS):
        k0 = k_lo + s * STEP
        if SP2:
            qw = gl.load(qw_tile + 2 * k0)
            mw = gl.load(meta_tile + 2 * k0)
            for u in gl.static_range(4):  # word u: mma.sp 2u (selector 0) and 2u + 1 (selector 1)
                w = gl.convert_layout(_pick(qw, u, 4), L_A, assert_trivial=True)
                a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w],
                                                                           dtype=(gl.int32,) * 8, is_pure=True, pack=1)
                meta = gl.expand_dims(gl.convert_layout(_pick(mw, u, 4), L_A, assert_trivial=True), 1)
                col = k0 + 64 * u
                if SCALE_MODE == 1:
                    s_lo = gl.expand_dims(gl.load(scale_lo + col // GROUP_SIZE).to(gl.float32), 1)
                    s_hi = gl.expand_dims(gl.load(scale_hi + col // GROUP_SIZE).to(gl.float32), 1)
                _store_instr(gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1),
                             gl.expand_dims(a3, 1), meta, sel, zero_b, zero, out_lo, out_hi, col, s_lo, s_hi, MMA0,
                             CVT, CONSTRAINTS_M, CONSTRAINTS_C)
                _store_instr(gl.expand_dims(a4, 1), gl.expand_dims(a5, 1), gl.expand_dims(a6, 1),
                             gl.expand_dims(a7, 1), meta, sel, zero_b, zero, out_lo, out_hi, col + 32, s_lo, s_hi,
                             MMA1, CVT, CONSTRAINTS_M, CONSTRAINTS_C)
        else:
            qw = gl.load(qw_tile + 4 * k0)
            mw = gl.load(meta_tile + 2 * k0)
            for j in gl.static_range(4):  # word j: mma.sp j, meta word j // 2 with selector j % 2
                w = gl.convert_layout(_pick(qw, j, 4), L_A, assert_trivial=True)
                a0, a1, a2, a3 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 4,
                                                           is_pure=True, pack=1)
                meta = gl.expand_dims(gl.convert_layout(_pick(mw, j // 2, 2), L_A, assert_trivial=True), 1)
                col = k0 + 32 * j
                if SCALE_MODE == 1:
                    s_lo = gl.expand_dims(gl.load(scale_lo + col // GROUP_SIZE).to(gl.float32), 1)
                    s_hi = gl.expand_dims(gl.load(scale_hi + col // GROUP_SIZE).to(gl.float32), 1)
                if j % 2 == 0:
                    _store_instr(gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1),
                                 gl.expand_dims(a3, 1), meta, sel, zero_b, zero, out_lo, out_hi, col, s_lo, s_hi,
                                 MMA0, CVT, CONSTRAINTS_M, CONSTRAINTS_C)
                else:
                    _store_instr(gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1),
                                 gl.expand_dims(a3, 1), meta, sel, zero_b, zero, out_lo, out_hi, col, s_lo, s_hi,
                                 MMA1, CVT, CONSTRAINTS_M, CONSTRAINTS_C)
