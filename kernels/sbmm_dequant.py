"""Dense Δ rows from sp4 / sp2 slot words on the sparse tensor cores (Gluon): the dequantization of the prefill path.

A segment of hundreds of rows on one delta costs the SBMM kernels one expansion of every delta word per 16 rows
(docs/kernels.md run 20: a prefill launch ~2.6x the base GEMM of its shape). Past a row count it is cheaper to
expand the delta once into a dense fp16/bf16 buffer and let cuBLAS multiply (kernels/delta_linear.py,
`dense_rows` in kernels/sbmm_configs.json).

The expansion is the SBMM kernels' own: a word's kept codes become the A registers of one `mma.sp` (sp2: of two)
and the meta words its metadata, as stored (kernels/sbmm_spmma.py has the fragment rules). The MMA then multiplies
by a selection matrix B_c (c = 0..3) with one 1 per column: B_c[k, n] = 1 where k = 8 (n // 2) + 2c + n % 2, so
D[:, n] = A[:, 8 (n // 2) + 2c + n % 2] and the four MMAs together give the instruction's 16 x 32 block of Δ at its
dense positions, the tensor core doing the 2:4 placement. Instruction j of a K step covers the step's dense columns
32j .. 32j + 31 in both orders. A lane (g = lane >> 2, t = lane & 3) holds D columns n = 2t, 2t + 1 of rows g and
g + 8, which B_c maps to columns 8t + 2c, 8t + 2c + 1: over c its eight consecutive columns, one 16-byte store
per row. Its B register m holds K 8m + 2t, 8m + 2t + 1 of column g, so B_c is non-zero only in lanes t = c, in
register g // 2 and its half g % 2 (1.0). D is scaled in fp32 (per row, or by the group of its 128 columns),
rounded to fp16/bf16 in pairs (`cvt_ptx`). Each program expands 64 rows x STEPS K steps, the next step's words,
meta and scales loaded before this step's stores (a load after a store to `out` could alias it and would wait).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels.sbmm_spmma import _pick, _sp4_tiles
from kernels.sbmm_spmma2 import _sp2_tile_at

ONE = {"f16": 0x3C00, "bf16": 0x3F80}  # 1.0 as a 16-bit pattern


def cvt_ptx(dtype: str) -> tuple[str, str]:
    """(PTX, constraints): two fp32 -> one fp16x2 / bf16x2 register, the first in the low half (round to nearest)."""
    return f"cvt.rn.{dtype}x2.f32 $0, $2, $1;", "=r,f,f"


def unpack_ptx(dtype: str) -> tuple[str, str]:
    """(PTX, constraints): one fp16x2 / bf16x2 register -> two fp32, the low half first (exact)."""
    if dtype == "f16":
        return ("{ .reg .b16 %l, %h; mov.b32 {%l, %h}, $2; cvt.f32.f16 $0, %l; cvt.f32.f16 $1, %h; }",
                "=f,=f,r")
    return "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }", "=f,=f,r"  # bf16: the top half of an fp32


@gluon.jit
def _selection(g, t, m: gl.constexpr, c: gl.constexpr, ONE_BITS: gl.constexpr):
    """B register m of the selection B_c, per lane ([1, 1, 32] int32): 1.0 in half g % 2 where t = c, m = g // 2."""
    bits = gl.where((t == c) & (g // 2 == m), ONE_BITS << (16 * (g % 2)), 0)
    return gl.expand_dims(gl.expand_dims(bits, 0), 0)


@gluon.jit
def _selection_regs(L_B: gl.constexpr, c: gl.constexpr, ONE_BITS: gl.constexpr):
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, L_B))
    g, t = lane // 4, lane % 4
    return (_selection(g, t, 0, c, ONE_BITS), _selection(g, t, 1, c, ONE_BITS), _selection(g, t, 2, c, ONE_BITS),
            _selection(g, t, 3, c, ONE_BITS))


@gluon.jit
def _as_words(v, L_A: gl.constexpr):
    """[RB, 1, 32] (L_S) -> [RB, 32] (L_A): the same registers."""
    return gl.convert_layout(gl.reshape(v, [v.shape[0], v.shape[2]]), L_A, assert_trivial=True)


@gluon.jit
def _pair(a0, a1, a2, a3, meta, bc, zero, s_lo, s_hi, w_lo, w_hi, c: gl.constexpr, MMA: gl.constexpr,
          CVT: gl.constexpr, UNPACK: gl.constexpr, ADD_BASE: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
          CONSTRAINTS_C: gl.constexpr, CONSTRAINTS_U: gl.constexpr, L_A: gl.constexpr):
    """One selection MMA (B registers bc): the lane's columns 8t + 2c, + 1 of rows g and g + 8, scaled (plus the
    base weight's pair c of w_lo / w_hi with ADD_BASE) and rounded to one fp16x2 / bf16x2 word each ([RB, 32])."""
    b0, b1, b2, b3 = bc
    d0, d1, d2, d3 = gl.inline_asm_elementwise(MMA, CONSTRAINTS_M, [a0, a1, a2, a3, b0, b1, b2, b3, meta, zero, zero,
                                                                    zero, zero],
                                               dtype=(gl.float32,) * 4, is_pure=True, pack=1)
    v0, v1, v2, v3 = d0 * s_lo, d1 * s_lo, d2 * s_hi, d3 * s_hi
    if ADD_BASE:
        w0, w1 = gl.inline_asm_elementwise(UNPACK, CONSTRAINTS_U, [_word(w_lo, c, L_A)], dtype=(gl.float32,) * 2,
                                           is_pure=True, pack=1)
        w2, w3 = gl.inline_asm_elementwise(UNPACK, CONSTRAINTS_U, [_word(w_hi, c, L_A)], dtype=(gl.float32,) * 2,
                                           is_pure=True, pack=1)
        v0, v1, v2, v3 = v0 + w0, v1 + w1, v2 + w2, v3 + w3
    lo = gl.inline_asm_elementwise(CVT, CONSTRAINTS_C, [v0, v1], dtype=gl.int32, is_pure=True, pack=1)
    hi = gl.inline_asm_elementwise(CVT, CONSTRAINTS_C, [v2, v3], dtype=gl.int32, is_pure=True, pack=1)
    return _as_words(lo, L_A), _as_words(hi, L_A)


@gluon.jit
def _word(w, c: gl.constexpr, L_A: gl.constexpr):
    """Word c of a lane's four ([RB, 32, 4], L_W) as [RB, 1, 32] (L_S)."""
    return gl.expand_dims(gl.convert_layout(_pick(w, c, 4), L_A, assert_trivial=True), 1)


@gluon.jit
def _instr(a0, a1, a2, a3, meta, b, zero, out_lo, out_hi, s_lo, s_hi, w_lo, w_hi, MMA: gl.constexpr,
           CVT: gl.constexpr, UNPACK: gl.constexpr, ADD_BASE: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
           CONSTRAINTS_C: gl.constexpr, CONSTRAINTS_U: gl.constexpr, L_A: gl.constexpr, L_W: gl.constexpr):
    """Δ columns of one mma.sp (A a0..a3 and meta, [RB, 1, 32]) for rows g and g + 8: four selection MMAs, then
    each lane's eight columns of a row as one 16-byte store (out_lo / out_hi: [RB, 32, 4] int32 pointers; w_lo /
    w_hi: the base weight's words at the same places, ADD_BASE)."""
    lo0, hi0 = _pair(a0, a1, a2, a3, meta, b[0], zero, s_lo, s_hi, w_lo, w_hi, 0, MMA, CVT, UNPACK, ADD_BASE,
                     CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A)
    lo1, hi1 = _pair(a0, a1, a2, a3, meta, b[1], zero, s_lo, s_hi, w_lo, w_hi, 1, MMA, CVT, UNPACK, ADD_BASE,
                     CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A)
    lo2, hi2 = _pair(a0, a1, a2, a3, meta, b[2], zero, s_lo, s_hi, w_lo, w_hi, 2, MMA, CVT, UNPACK, ADD_BASE,
                     CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A)
    lo3, hi3 = _pair(a0, a1, a2, a3, meta, b[3], zero, s_lo, s_hi, w_lo, w_hi, 3, MMA, CVT, UNPACK, ADD_BASE,
                     CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A)
    gl.store(out_lo, _four(lo0, lo1, lo2, lo3, L_W))
    gl.store(out_hi, _four(hi0, hi1, hi2, hi3, L_W))


@gluon.jit
def _four(w0, w1, w2, w3, L_W: gl.constexpr):
    """Four [RB, 32] tensors -> [RB, 32, 4] (L_W: a lane's four in its registers), w_i at index i (the inverse of
    kernels/sbmm_spmma.py `_pick`)."""
    v = gl.join(gl.join(w0, w2), gl.join(w1, w3))  # [RB, 32, a, b]: w_(2a + b)
    return gl.convert_layout(gl.reshape(v, [v.shape[0], v.shape[1], 4]), L_W, assert_trivial=True)


@gluon.jit
def _load_words(qw_tile, meta_tile, scale_lo, scale_hi, k0, SP2: gl.constexpr, GROUP_SIZE: gl.constexpr,
                SCALE_MODE: gl.constexpr):
    """One K step's words, meta words and group scales ([RB, 1, 32] fp32 of its first and last 128 columns; row
    scales: unused ones)."""
    if SP2:
        qw = gl.load(qw_tile + 2 * k0)
    else:
        qw = gl.load(qw_tile + 4 * k0)
    mw = gl.load(meta_tile + 2 * k0)
    if SCALE_MODE == 1:
        last = k0 + (128 if SP2 else 0)
        s = (gl.load(scale_lo + k0 // GROUP_SIZE), gl.load(scale_hi + k0 // GROUP_SIZE),
             gl.load(scale_lo + last // GROUP_SIZE), gl.load(scale_hi + last // GROUP_SIZE))
    else:
        s = (gl.load(scale_lo), gl.load(scale_hi), gl.load(scale_lo), gl.load(scale_hi))
    return qw, mw, s


@gluon.jit
def _load_base(base_lo, base_hi, pairs, SP2: gl.constexpr):
    """The base weight's words of one unit (a word's mma.sp: sp4 one, 32 columns; sp2 two, 64) from column pair
    `pairs`: (lo, hi) of its first mma.sp and, sp2, of its second (sp4: the first again, not re-read)."""
    lo = gl.load(base_lo + pairs)
    hi = gl.load(base_hi + pairs)
    if SP2:
        return lo, hi, gl.load(base_lo + pairs + 16), gl.load(base_hi + pairs + 16)
    else:
        return lo, hi, lo, hi


@gluon.jit
def _s32(v):
    return gl.expand_dims(v.to(gl.float32), 1)


@gluon.jit
def _unit(qw, mw, s, u: gl.constexpr, cols, out_lo, out_hi, bw, b, zero, SP2: gl.constexpr,
          ADD_BASE: gl.constexpr, EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr, CVT: gl.constexpr,
          UNPACK: gl.constexpr, CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
          CONSTRAINTS_C: gl.constexpr, CONSTRAINTS_U: gl.constexpr, L_A: gl.constexpr, L_W: gl.constexpr):
    """Word u of a K step (column pairs from `cols`): sp4 mma.sp u (meta word u // 2, selector u % 2, 32 columns);
    sp2 mma.sp 2u and 2u + 1 (meta word u, selectors 0 and 1, 64 columns)."""
    w = gl.convert_layout(_pick(qw, u, 4), L_A, assert_trivial=True)
    if SP2:
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 8,
                                                                   is_pure=True, pack=1)
        meta = gl.expand_dims(gl.convert_layout(_pick(mw, u, 4), L_A, assert_trivial=True), 1)
        s_lo = _s32(s[0] if u < 2 else s[2])
        s_hi = _s32(s[1] if u < 2 else s[3])
        at = cols + 32 * u
        _instr(gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1), gl.expand_dims(a3, 1), meta, b,
               zero, out_lo + at, out_hi + at, s_lo, s_hi, bw[0], bw[1], MMA0, CVT, UNPACK, ADD_BASE, CONSTRAINTS_M,
               CONSTRAINTS_C, CONSTRAINTS_U, L_A, L_W)
        _instr(gl.expand_dims(a4, 1), gl.expand_dims(a5, 1), gl.expand_dims(a6, 1), gl.expand_dims(a7, 1), meta, b,
               zero, out_lo + at + 16, out_hi + at + 16, s_lo, s_hi, bw[2], bw[3], MMA1, CVT, UNPACK, ADD_BASE,
               CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A, L_W)
    else:
        a0, a1, a2, a3 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 4, is_pure=True,
                                                   pack=1)
        meta = gl.expand_dims(gl.convert_layout(_pick(mw, u // 2, 2), L_A, assert_trivial=True), 1)
        at = cols + 16 * u
        _instr(gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1), gl.expand_dims(a3, 1), meta, b,
               zero, out_lo + at, out_hi + at, _s32(s[0]), _s32(s[1]), bw[0], bw[1], MMA0 if u % 2 == 0 else MMA1,
               CVT, UNPACK, ADD_BASE, CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A, L_W)


@gluon.jit
def _dequant_kernel(
    # one slot's sp4 / sp2 words and meta (any leading slot offset applied), scales fp16 [N, G]
    qw_ptr, meta_ptr, scales_ptr, stride_sn,
    # out: int32 view [rows, K / 2] of fp16/bf16 [rows, K]: Δ rows row0 .. row0 + rows
    out_ptr, stride_o, row0,
    # ADD_BASE: the base weight, int32 view [N, K / 2] of fp16/bf16 [N, K]; out = base + Δ
    base_ptr, stride_b,
    K: gl.constexpr, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr, SP2: gl.constexpr,
    BLOCK_N: gl.constexpr, STEPS: gl.constexpr, ONE_BITS: gl.constexpr, ADD_BASE: gl.constexpr,
    EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr, CVT: gl.constexpr, UNPACK: gl.constexpr,
    CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, CONSTRAINTS_C: gl.constexpr,
    CONSTRAINTS_U: gl.constexpr, L_S: gl.constexpr, L_W: gl.constexpr, L_META: gl.constexpr,
):
    RB: gl.constexpr = BLOCK_N // 16
    STEP: gl.constexpr = 256 if SP2 else 128  # dense columns per K step of the order
    UNIT_PAIRS: gl.constexpr = STEP // 8  # column pairs per word u (four words a step)
    L_A: gl.constexpr = gl.SliceLayout(1, L_S)  # [RB, 32]: per 16-row block and lane
    L_B: gl.constexpr = gl.SliceLayout(0, L_S)  # [1, 32]
    n0 = row0 + gl.program_id(0) * BLOCK_N
    k_lo = gl.program_id(1) * (STEPS * STEP)
    k_last = k_lo + (STEPS - 1) * STEP
    # words and meta: 16-row blocks n0 / 16 + rb, addressed as the SBMM kernels address them
    if SP2:
        tile_at = _sp2_tile_at(n0, K, RB, L_W)
        qw_tile = qw_ptr + tile_at
        meta_tile = meta_ptr + tile_at
    else:
        qw_tile, meta_tile = _sp4_tiles(qw_ptr, meta_ptr, n0, K, RB, L_W, L_META)
    rb_w = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_W)))
    lane_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_W)))
    u_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_W)))
    # out (and base): row g of each 16-row block (row g + 8: + 8 rows), the lane's 8 columns 8t .. 8t + 7 of each 32
    rows_w = n0 + 16 * (rb_w - n0 // 16)[:, None] + (lane_w // 4)[None, :]
    lane_cols = (4 * (lane_w % 4))[None, :, None] + u_w[None, None, :]
    out_lo = out_ptr + ((rows_w - row0) * stride_o)[:, :, None] + lane_cols
    out_hi = out_lo + 8 * stride_o
    rb_a = gl.arange(0, RB, layout=gl.SliceLayout(1, L_A))
    lane_a = gl.arange(0, 32, layout=gl.SliceLayout(0, L_A))
    scale_lo = scales_ptr + (n0 + 16 * rb_a[:, None] + lane_a[None, :] // 4) * stride_sn
    scale_hi = scale_lo + 8 * stride_sn
    b = (_selection_regs(L_B, 0, ONE_BITS), _selection_regs(L_B, 1, ONE_BITS), _selection_regs(L_B, 2, ONE_BITS),
         _selection_regs(L_B, 3, ONE_BITS))
    zero = gl.zeros([RB, 1, 32], gl.float32, layout=L_S)
    qw, mw, s = _load_words(qw_tile, meta_tile, scale_lo, scale_hi, k_lo, SP2, GROUP_SIZE, SCALE_MODE)
    if ADD_BASE:  # the base words one unit ahead: loaded before the stores of the unit before them
        base_lo = base_ptr + (rows_w * stride_b)[:, :, None] + lane_cols
        base_hi = base_lo + 8 * stride_b
        bw = _load_base(base_lo, base_hi, k_lo // 2, SP2)
    else:
        bw = (zero, zero, zero, zero)
    for i in range(STEPS):
        k0 = k_lo + i * STEP
        # the next step's loads first (the last step re-reads itself)
        qw_n, mw_n, s_n = _load_words(qw_tile, meta_tile, scale_lo, scale_hi, gl.minimum(k0 + STEP, k_last), SP2,
                                      GROUP_SIZE, SCALE_MODE)
        cols = k0 // 2  # int32 column pairs
        for u in gl.static_range(4):
            if ADD_BASE:
                if u < 3:
                    bw_n = _load_base(base_lo, base_hi, cols + UNIT_PAIRS * (u + 1), SP2)
                else:
                    bw_n = _load_base(base_lo, base_hi, gl.minimum(k0 + STEP, k_last) // 2, SP2)
            _unit(qw, mw, s, u, cols, out_lo, out_hi, bw, b, zero, SP2, ADD_BASE, EXPAND, MMA0, MMA1, CVT, UNPACK,
                  CONSTRAINTS_E, CONSTRAINTS_M, CONSTRAINTS_C, CONSTRAINTS_U, L_A, L_W)
            if ADD_BASE:
                bw = bw_n
        qw, mw, s = qw_n, mw_n, s_n
