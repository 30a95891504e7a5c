"""SBMM in portable Triton: y[seg] += x[seg] @ dequant(Δ_slot(seg)).T for every segment, one launch.

Δ is 2:4 sparse along K with 2- or 4-bit codes in the canonical layout of kernels/packing.py, read as is, in row
order or (TILED, 4-bit) with words and meta stored tile-major (kernels/layout.py).
Tiles: program (n, t) owns output columns [n*BLOCK_N, +BLOCK_N) of the t-th BLOCK_M-row tile, where tiles
are numbered segment by segment (a segment of L rows has ceil(L / BLOCK_M) tiles; "no delta" segments
have none). Each program finds its tile from seg_starts / seg_slots itself, so the launch needs no host
sync and the grid is an upper bound (ceil(T / BLOCK_M) + S tiles); surplus programs do nothing.
Per K step a program loads BLOCK_N rows of packed words, expands them to a dense [BLOCK_N, BLOCK_K] tile
in the activation dtype (plain Triton, or the PTX of kernels/sbmm_asm.py) and feeds tl.dot; accumulation
is fp32 and y is updated once at the end (y + acc in fp32, rounded once). This is the kernel the CPU tests
run under TRITON_INTERPRET=1 and the GPU fallback for shapes the faster kernels/sbmm_gluon.py does not take;
the torch reference with the same semantics is kernels/reference.py.
"""

import triton
import triton.language as tl

from kernels.layout import tiled_index

# Every SBMM kernel takes the segments as (seg_starts_ptr, seg_slots_ptr, num_segments). Triton would compile a
# variant per num_segments == 1 / divisible by 16 and per pointer alignment (a CUDA graph's index tensors are views
# at odd offsets); none of that speeds the few segment loads, so one variant serves every segment count
# (kernels/sbmm_warmup.py compiles fewer variants ahead).
SEGMENT_ARGS = ("num_segments",)
SEGMENT_POINTERS = ("seg_starts_ptr", "seg_slots_ptr")

SCALE_ROW, SCALE_TILE, SCALE_SPLIT = 0, 1, 2  # one scale per row / per K tile / several groups per K tile
# Output dtypes of the word expander: one half per dense column of a 4-bit (16) or 2-bit (32) word.
_F16_X16 = tl.constexpr((tl.float16,) * 16)
_BF16_X16 = tl.constexpr((tl.bfloat16,) * 16)
_F16_X32 = tl.constexpr((tl.float16,) * 32)
_BF16_X32 = tl.constexpr((tl.bfloat16,) * 32)


@triton.jit
def _find_tile(pid_t, seg_starts_ptr, seg_slots_ptr, num_segments, num_slots, BLOCK_M: tl.constexpr,
               MAX_SEGS: tl.constexpr):
    """Tile number -> (first row, end row, slot); end <= first when the program has no tile."""
    i = tl.arange(0, MAX_SEGS)
    live = i < num_segments
    lo = tl.load(seg_starts_ptr + i, mask=live, other=0)
    hi = tl.load(seg_starts_ptr + i + 1, mask=live, other=0)
    slot = tl.load(seg_slots_ptr + i, mask=live, other=-1)
    has_delta = live & (slot >= 0) & (slot < num_slots) & (hi > lo)
    num_tiles = tl.where(has_delta, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    ends = tl.cumsum(num_tiles, 0)
    seg = tl.sum((ends <= pid_t).to(tl.int32), 0)  # first segment whose tiles reach past pid_t
    mine = i == seg
    tile = pid_t - tl.sum(tl.where(mine, ends - num_tiles, 0), 0)
    m_start = tl.sum(tl.where(mine, lo, 0), 0) + tile * BLOCK_M
    m_end = tl.minimum(tl.sum(tl.where(mine, hi, 0), 0), m_start + BLOCK_M)
    return m_start, m_end, tl.sum(tl.where(mine, slot, 0), 0)


@triton.jit
def _cat(a, b):
    """[R, C, L] x2 -> [R, C, 2L] with a at even and b at odd positions."""
    j = tl.join(a, b)
    return tl.reshape(j, (j.shape[0], j.shape[1], j.shape[2] * 2))


@triton.jit
def _interleave(o, LO: tl.constexpr, NUM: tl.constexpr):
    """Tuple of NUM [R, C] tensors -> [R, C, NUM]; position p holds o[LO + bitreverse(p)]."""
    if NUM == 1:
        return tl.expand_dims(o[LO], 2)
    else:
        return _cat(_interleave(o, LO, NUM // 2), _interleave(o, LO + NUM // 2, NUM // 2))


@triton.jit
def _expand_asm(qw, mw, s2, z2, zq2, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, DTYPE: tl.constexpr,
                BITS: tl.constexpr, ASYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words [BN, NW] -> dense [BN, BK] in DTYPE via the PTX of kernels/sbmm_asm.py."""
    if ASYM:
        args = [qw, mw, s2, z2, zq2]
    else:
        args = [qw, mw, s2, z2]
    if BITS == 4:
        if DTYPE == tl.float16:
            o = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=_F16_X16, is_pure=True, pack=1)
        else:
            o = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=_BF16_X16, is_pure=True, pack=1)
        w = _interleave(o, 0, 16)
    else:
        if DTYPE == tl.float16:
            o = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=_F16_X32, is_pure=True, pack=1)
        else:
            o = tl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=_BF16_X32, is_pure=True, pack=1)
        w = _interleave(o, 0, 32)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _expand_triton(qw, mw, sc, zc, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words [BN, NW] -> dense fp32 [BN, BK] in plain Triton (interpreter and fallback path)."""
    DPW: tl.constexpr = 64 // BITS  # dense columns per word
    d = tl.arange(0, DPW)
    grp = (d // 4)[None, None, :]
    pos = (d % 4)[None, None, :]
    q3 = qw[:, :, None]
    m3 = mw[:, :, None]
    code0 = (q3 >> (2 * grp * BITS)) & ((1 << BITS) - 1)
    code1 = (q3 >> ((2 * grp + 1) * BITS)) & ((1 << BITS) - 1)
    nib = (m3 >> (4 * grp)) & 15
    first = pos == (nib & 3)
    kept = first | (pos == ((nib >> 2) & 3))
    code = tl.where(first, code0, code1).to(tl.float32)
    w = tl.where(kept, (code - zc[:, :, None]) * sc[:, :, None], 0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _half2_bits(v, DTYPE: tl.constexpr):
    """fp16 tensor -> int32 holding the DTYPE bits of v in both 16-bit lanes."""
    h = v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit(do_not_specialize=SEGMENT_ARGS, do_not_specialize_on_alignment=SEGMENT_POINTERS)
def _sbmm_kernel(
    # activations x: [T, K], output y: [T, N]; unit stride along K / N
    x_ptr, y_ptr, stride_xm, stride_ym,
    # slot-stacked packed delta: qweight [slots, N, K/DPW] int32, meta [slots, N, K/DPW] int16 (4-bit) or
    # int32 (2-bit) (canonical meta viewed so one element covers one qweight word), scales/zeros [slots, N, G];
    # TILED: qweight and the int16 meta view in tile-major blocks (kernels/layout.py), row strides unused
    qw_ptr, meta_ptr, scales_ptr, zeros_ptr,
    stride_qs, stride_qn, stride_ms, stride_mn, stride_ss, stride_sn,
    # segments: rows seg_starts[s]:seg_starts[s+1] use slot seg_slots[s] (-1: none)
    seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
    N, K: tl.constexpr, group_size,
    BITS: tl.constexpr, ASYM: tl.constexpr, SCALE_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAX_SEGS: tl.constexpr,
    EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, Z2: tl.constexpr,
    DOT_FP32: tl.constexpr, TILED: tl.constexpr,
):
    DPW: tl.constexpr = 64 // BITS
    NW: tl.constexpr = BLOCK_K // DPW
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    m_start, m_end, slot = _find_tile(tl.program_id(1), seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
                                      BLOCK_M, MAX_SEGS)
    if m_end <= m_start:  # surplus program of the upper-bound grid
        return
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < m_end
    mask_n = offs_n < N
    slot64 = slot.to(tl.int64)
    if TILED:  # the row offsets are part of tiled_index below
        qw_rows = qw_ptr + slot64 * stride_qs
        meta_rows = meta_ptr + slot64 * stride_ms
    else:
        qw_rows = qw_ptr + slot64 * stride_qs + offs_n[:, None] * stride_qn  # [BN, 1]
        meta_rows = meta_ptr + slot64 * stride_ms + offs_n[:, None] * stride_mn
    scale_rows = scales_ptr + slot64 * stride_ss + offs_n * stride_sn  # [BN]
    zero_rows = zeros_ptr + slot64 * stride_ss + offs_n * stride_sn
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_w = k0 // DPW + tl.arange(0, NW)
        if TILED:  # [BN, NW] offsets of the step's words (and int16 meta halves) in their blocks
            words = tiled_index(offs_n[:, None], offs_w[None, :], K // DPW)
        else:
            words = offs_w[None, :]
        if EVEN_K:
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            qw = tl.load(qw_rows + words, mask=mask_n[:, None], other=0)
            mw = tl.load(meta_rows + words, mask=mask_n[:, None], other=0).to(tl.int32)
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
            wmask = mask_n[:, None] & (offs_w < K // DPW)[None, :]
            qw = tl.load(qw_rows + words, mask=wmask, other=0)
            mw = tl.load(meta_rows + words, mask=wmask, other=0).to(tl.int32)
        # scale (and zero) of each word: [BN, 1] or [BN, NW]
        if SCALE_MODE == 0:
            sc = tl.load(scale_rows, mask=mask_n, other=0.0)[:, None]
            zc = tl.load(zero_rows, mask=mask_n, other=0.0)[:, None] if ASYM else sc
        elif SCALE_MODE == 1:
            g = k0 // group_size
            sc = tl.load(scale_rows + g, mask=mask_n, other=0.0)[:, None]
            zc = tl.load(zero_rows + g, mask=mask_n, other=0.0)[:, None] if ASYM else sc
        else:
            col = k0 + tl.arange(0, NW) * DPW
            smask = mask_n[:, None] & (col < K)[None, :]
            g = (col // group_size)[None, :]
            sc = tl.load(scale_rows[:, None] + g, mask=smask, other=0.0)
            zc = tl.load(zero_rows[:, None] + g, mask=smask, other=0.0) if ASYM else sc
        if USE_ASM:
            s2 = _half2_bits(sc, DTYPE)
            zq2 = _half2_bits(zc, DTYPE)  # unused when symmetric
            z2 = tl.full((BLOCK_N, 1), Z2, tl.int32)
            w = _expand_asm(qw, mw, s2, z2, zq2, ASM, CONSTRAINTS, DTYPE, BITS, ASYM, BLOCK_N, BLOCK_K)
        else:
            zf = zc.to(tl.float32) if ASYM else tl.full(sc.shape, 1 << (BITS - 1), tl.float32)
            w = _expand_triton(qw, mw, sc.to(tl.float32), zf, BITS, BLOCK_N, BLOCK_K).to(DTYPE)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong; fp32 there is exact enough
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)
