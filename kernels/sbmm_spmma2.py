"""SBMM on the sparse tensor cores for 2-bit symmetric 2:4 deltas in the sp2 order (kernels/spmma_layout.py pack_sp2).

The 4-bit kernel's approach (kernels/sbmm_spmma.py: its docstring has the mma.sp fragment and metadata rules)
at 2 bits: only the kept codes are expanded, straight into the A registers, and the meta words are the
metadata registers as stored. A K step is 256 columns = 8 mma.sp j, so that a lane's share of a step stays one
16-byte load of words (4 words, 16 codes = two mma.sp each) and one of meta (4 words, each the metadata
register of mma.sp 2v and 2v + 1 with selectors 0 and 1). Per word: 7 `shr` + 8 `lop3` + 8 half2 `sub` (bf16:
`fma`) give the 8 A registers of its two mma.sp as (magic + q) - (magic + 2) = q - 2, exact. The launch option
"expand": "fma" takes 1 (bf16: 2) `shr` instead of 7, with an `fma` per pair (kernels/sbmm_spmma.py FMA_SHIFTS;
13-20 % fewer K-loop instructions for sm_90, docs/kernels.md run 23; in the H100 / H200 table's BLOCK_M 8 entries and
its <= 16-row BLOCK_M 16 entry since runs 24 and 25, measured on an H200).
x: the 256-column step is two 128-column halves in the sp4 B order (kernels/spmma_layout.py sp4_x, unchanged): B
register n = 4j + m of a lane is pair 64 * (n // 16) + 16t + n % 16 of the step, two runs of 64 contiguous
bytes. That is 32 registers per 8 tokens (twice sp4's), so the wrapper caps BLOCK_M at 16.
Scales per row (once at the end), or per group of a multiple of 128 columns on the fp32 product of each step
(groups of an odd multiple of 128: of each 128-column half). PREFETCH as in kernels/sbmm_spmma.py: 1 loads the
next step during this one's MMAs, 2 keeps two steps in flight.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels.sbmm_gluon import _find_tile, _split_range
from kernels.sbmm_triton import SEGMENT_ARGS, SEGMENT_POINTERS
from kernels.sbmm_spmma import (_bits, _epilogue, _k_loop, _linear, _pick, _scale_rows, _scaled, fma_expand_ptx,
                                 gdc_launch_dependents, gdc_wait)

STEP_K = gl.constexpr(256)  # dense columns per K step (8 x mma.sp m16n8k32)
MAGIC = {"f16": (0x64006400, 0x64026402), "bf16": (0x43004300, 0x43024302)}  # (1024 | 128) + code, + zero 2


def expand_ptx(dtype: str, expand: str = "shift") -> tuple[str, str]:
    """(PTX, constraints): one sp2 word -> the 8 half2 A registers (a0..a3 of mma.sp 2u, then of 2u + 1), code - 2.
    expand: "shift" (a shift per pair, then lop3 and a half2 sub) or "fma" (kernels/sbmm_spmma.py FMA_SHIFTS)."""
    if expand == "fma":
        return fma_expand_ptx(dtype, 2, 2)
    if expand != "shift":
        raise ValueError(f"unknown word expander {expand!r}; valid: shift, fma")
    magic, zero = MAGIC[dtype]
    lines = ["{", ".reg .b32 %s<8>, %c<8>, %z, %one;"]
    lines += [f"shr.u32 %s{p}, $8, {2 * p};" for p in range(1, 8)]
    lines += [f"lop3.b32 %c{p}, {'$8' if p == 0 else f'%s{p}'}, {0x00030003}, {magic}, 234;" for p in range(8)]
    if dtype == "f16":
        lines.append(f"mov.b32 %z, {zero};")
        lines += [f"sub.rn.f16x2 ${p}, %c{p}, %z;" for p in range(8)]
    else:  # fma (sm_80) rather than sub.bf16x2 (sm_90): (128 + q) * 1 - 130, exact
        lines += [f"mov.b32 %z, {zero | 0x80008000};", "mov.b32 %one, 1065369472;"]
        lines += [f"fma.rn.bf16x2 ${p}, %c{p}, %one, %z;" for p in range(8)]
    lines.append("}")
    return "\n".join(lines), ",".join(["=r"] * 8 + ["r"])


@gluon.jit
def _b_reg(xb, n: gl.constexpr, L_B: gl.constexpr):
    """B register n (0..31) of this step, [1, TB, 32]."""
    return gl.expand_dims(gl.convert_layout(_pick(xb, n, 32), L_B, assert_trivial=True), 0)


@gluon.jit
def _b_regs(xb, n: gl.constexpr, L_B: gl.constexpr):
    """B registers n .. n + 3: the b0..b3 of one mma.sp."""
    return _b_reg(xb, n, L_B), _b_reg(xb, n + 1, L_B), _b_reg(xb, n + 2, L_B), _b_reg(xb, n + 3, L_B)


@gluon.jit
def _mma_half(acc, xb, qw, mw, U0: gl.constexpr, EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
              CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr):
    """acc (4 fp32 [RB, TB, 32]) += the 4 mma.sp of words U0 and U0 + 1 (one 128-column half of the step)."""
    c0, c1, c2, c3 = acc
    for du in gl.static_range(2):
        w = gl.convert_layout(_pick(qw, U0 + du, 4), L_A, assert_trivial=True)
        a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 8,
                                                                   is_pure=True, pack=1)
        meta = gl.expand_dims(gl.convert_layout(_pick(mw, U0 + du, 4), L_A, assert_trivial=True), 1)
        # mma.sp j = 2u with selector 0, then 2u + 1 with selector 1: B registers 4j .. 4j + 7 (8u = 8 (U0 + du))
        b0, b1, b2, b3 = _b_regs(xb, 8 * (U0 + du) + 0, L_B)
        args = [gl.expand_dims(a0, 1), gl.expand_dims(a1, 1), gl.expand_dims(a2, 1), gl.expand_dims(a3, 1),
                b0, b1, b2, b3, meta, c0, c1, c2, c3]
        c0, c1, c2, c3 = gl.inline_asm_elementwise(MMA0, CONSTRAINTS_M, args, dtype=(gl.float32,) * 4, is_pure=True,
                                                   pack=1)
        b0, b1, b2, b3 = _b_regs(xb, 8 * (U0 + du) + 4, L_B)
        args = [gl.expand_dims(a4, 1), gl.expand_dims(a5, 1), gl.expand_dims(a6, 1), gl.expand_dims(a7, 1),
                b0, b1, b2, b3, meta, c0, c1, c2, c3]
        c0, c1, c2, c3 = gl.inline_asm_elementwise(MMA1, CONSTRAINTS_M, args, dtype=(gl.float32,) * 4, is_pure=True,
                                                   pack=1)
    return c0, c1, c2, c3


@gluon.jit
def _sp2_tile_at(n0, K: gl.constexpr, RB: gl.constexpr, L_W: gl.constexpr):
    """Offsets [RB, 32, 4] of a lane's sp2 words, and of its meta words, at K step 0 of the 16-row blocks
    R = n0 / 16 + rb of one slot (kernels/spmma_layout.py pack_sp2): (R // 4) * 2K + (R % 4) * 128 + lane * 4 + u;
    dense column k0 adds 2 * k0 to both."""
    rb_w = n0 // 16 + gl.arange(0, RB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_W)))
    lane_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_W)))
    u_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_W)))
    return (((rb_w // 4) * (2 * K) + (rb_w % 4) * 128)[:, None, None] + (lane_w * 4)[None, :, None]
            + u_w[None, None, :])


@gluon.jit(do_not_specialize=SEGMENT_ARGS, do_not_specialize_on_alignment=SEGMENT_POINTERS)
def _sbmm_spmma2_kernel(
    # activations as fp16/bf16 pairs in the sp4 B order (kernels/spmma_layout.py sp4_x): int32 [T, K/2]; y: [T, N]
    x_ptr, y_ptr, stride_xm, stride_ym,
    # slot-stacked sp2 words and meta (kernels/spmma_layout.py pack_sp2), scales fp16 [slots, N, G]
    qw_ptr, meta_ptr, scales_ptr, stride_qs, stride_ms, stride_ss, stride_sn,
    # segments: rows seg_starts[s]:seg_starts[s+1] use slot seg_slots[s] (-1: none)
    seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
    # split-K (SPLIT_K > 1): fp32 partials ws [SPLIT_K, T, N], one arrival counter per output tile (zeroed)
    ws_ptr, counters_ptr, stride_wss,
    N, K: gl.constexpr, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MAX_SEGS: gl.constexpr,
    EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
    CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
    L_S: gl.constexpr, L_W: gl.constexpr, L_X: gl.constexpr, L_SEG: gl.constexpr,
    SPLIT_K: gl.constexpr, PREFETCH: gl.constexpr, PDL: gl.constexpr = False, X_DENSE: gl.constexpr = False,
):
    RB: gl.constexpr = BLOCK_N // 16
    TB: gl.constexpr = BLOCK_M // 8
    L_A: gl.constexpr = gl.SliceLayout(1, L_S)  # [RB, 32]: per 16-row block and lane
    L_B: gl.constexpr = gl.SliceLayout(0, L_S)  # [TB, 32]: per 8-token block and lane
    HALF_SCALES: gl.constexpr = SCALE_MODE == 1 and GROUP_SIZE % 256 != 0  # a scale group per 128-column half

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
    tile_at = _sp2_tile_at(n0, K, RB, L_W)
    qw_tile = qw_ptr + slot64 * stride_qs + tile_at
    meta_tile = meta_ptr + slot64 * stride_ms + tile_at
    # x pairs: token 8tb + g (rows past the tile re-read its last row, never stored); register n of lane t is
    # pair 64 * (n // 16) + 16t + n % 16 of the step (sp4_x order of each 128-column half)
    tb_x = gl.arange(0, TB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L_X)))
    lane_x = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, L_X)))
    n_x = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L_X)))
    tok_x = gl.minimum(m_start + 8 * tb_x[:, None] + lane_x[None, :] // 4, m_end - 1)
    if X_DENSE:  # x as given: pair 64 (n // 16) + 4 (n % 16) + t of the step, one 4-byte load per register
        x_rows = (x_ptr + (tok_x * stride_xm + lane_x[None, :] % 4)[:, :, None]
                  + (4 * (n_x % 16) + 64 * (n_x // 16))[None, None, :])
    else:
        x_rows = (x_ptr + (tok_x * stride_xm + 16 * (lane_x[None, :] % 4))[:, :, None]
                  + (n_x % 16 + 64 * (n_x // 16))[None, None, :])
    scale_lo, scale_hi = _scale_rows(scales_ptr, slot64, stride_ss, stride_sn, n0, RB, L_A)

    zero = gl.zeros([RB, TB, 32], gl.float32, layout=L_S)
    acc = (zero, zero, zero, zero)
    acc = _k_loop(acc, zero, x_rows, qw_tile, meta_tile, k_lo, k_hi, scale_lo, scale_hi, _k_step, STEP_K, 2,
                  PREFETCH, GROUP_SIZE, SCALE_MODE, HALF_SCALES, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M,
                  L_A, L_B, PDL)
    if SCALE_MODE == 0:  # one scale per row: applied once
        s_lo = gl.expand_dims(gl.load(scale_lo).to(gl.float32), 1)
        s_hi = gl.expand_dims(gl.load(scale_hi).to(gl.float32), 1)
        acc = _scaled((zero, zero, zero, zero), acc, s_lo, s_hi)
    _epilogue(acc, y_ptr, stride_ym, ws_ptr, counters_ptr, stride_wss, N, n0, m_start, m_end, pid_k, TB, RB, L_S,
              SPLIT_K)


@gluon.jit
def _k_step(acc, zero, xb, qw, mw, k0, scale_lo, scale_hi, GROUP_SIZE: gl.constexpr, SCALE_MODE: gl.constexpr,
            HALF_SCALES: gl.constexpr, EXPAND: gl.constexpr, MMA0: gl.constexpr, MMA1: gl.constexpr,
            CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr, L_A: gl.constexpr, L_B: gl.constexpr):
    """acc + one K step (256 columns) at dense column k0; group scales on the fp32 products, row scales after."""
    if HALF_SCALES:
        acc = _scaled_half(acc, xb, qw, mw, 0, scale_lo, scale_hi, k0 // GROUP_SIZE, EXPAND, MMA0, MMA1,
                           CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
        return _scaled_half(acc, xb, qw, mw, 2, scale_lo, scale_hi, (k0 + 128) // GROUP_SIZE, EXPAND, MMA0, MMA1,
                            CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
    elif SCALE_MODE == 1:  # one scale per row and step: on this step's fp32 product
        part = _mma_half((zero, zero, zero, zero), xb, qw, mw, 0, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M,
                         L_A, L_B)
        part = _mma_half(part, xb, qw, mw, 2, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
        s_lo = gl.expand_dims(gl.load(scale_lo + k0 // GROUP_SIZE).to(gl.float32), 1)
        s_hi = gl.expand_dims(gl.load(scale_hi + k0 // GROUP_SIZE).to(gl.float32), 1)
        return _scaled(acc, part, s_lo, s_hi)
    else:
        acc = _mma_half(acc, xb, qw, mw, 0, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)
        return _mma_half(acc, xb, qw, mw, 2, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M, L_A, L_B)


@gluon.jit
def _scaled_half(acc, xb, qw, mw, U0: gl.constexpr, scale_lo, scale_hi, group, EXPAND: gl.constexpr,
                 MMA0: gl.constexpr, MMA1: gl.constexpr, CONSTRAINTS_E: gl.constexpr, CONSTRAINTS_M: gl.constexpr,
                 L_A: gl.constexpr, L_B: gl.constexpr):
    """acc + (the 4 mma.sp of words U0, U0 + 1) * the scales of `group` (groups of an odd multiple of 128)."""
    zero = gl.zeros_like(acc[0])
    part = _mma_half((zero, zero, zero, zero), xb, qw, mw, U0, EXPAND, MMA0, MMA1, CONSTRAINTS_E, CONSTRAINTS_M,
                     L_A, L_B)
    s_lo = gl.expand_dims(gl.load(scale_lo + group).to(gl.float32), 1)
    s_hi = gl.expand_dims(gl.load(scale_hi + group).to(gl.float32), 1)
    return _scaled(acc, part, s_lo, s_hi)


def layouts(block_n: int, block_m: int, num_warps: int) -> dict:
    """L_S [RB, TB, 32] (one element per lane per MMA tile), L_W [RB, 32, 4] words or meta of a lane, L_X
    [TB, 32, 32] x pairs (kernels/sbmm_spmma.py `layouts`, with 32 B registers a step). Warps take 16-row
    blocks rb = warp + num_warps * r; every warp reads all of x."""
    rb, tb = block_n // 16, block_m // 8
    assert rb % num_warps == 0 and block_m % 8 == 0, "BLOCK_N must be a multiple of 16 * num_warps, BLOCK_M of 8"
    rb_regs = [[num_warps << i] for i in range(_bits(rb // num_warps))]
    warps = [[1 << i] for i in range(_bits(num_warps))]
    lay_s = _linear([[0, 1 << i, 0] for i in range(_bits(tb))] + [r + [0, 0] for r in rb_regs], 2,
                    [w + [0, 0] for w in warps], [rb, tb, 32])
    lay_w = _linear([[0, 0, 1], [0, 0, 2]] + [r + [0, 0] for r in rb_regs], 1, [w + [0, 0] for w in warps],
                    [rb, 32, 4])
    lay_x = _linear([[0, 0, 1 << i] for i in range(5)] + [[1 << i, 0, 0] for i in range(_bits(tb))], 1,
                    [[0, 0, 0] for _ in warps], [tb, 32, 32])
    return dict(L_S=lay_s, L_W=lay_w, L_X=lay_x)
