"""SBMM for NVIDIA GPUs in Gluon (Triton's explicit-layout dialect): expanded words feed the MMA in registers.

Two word formats: canonical 2:4 words with their meta (kernels/packing.py), and dense2 words (2-bit, no meta:
kernels/layout.py), which run with the 4-bit tile geometry (16 dense columns per word, HAS_META false). Word
order (TILED): dense2 words, and 4-bit words with their meta, are stored tile-major (kernels/layout.py), so one K
step of a program reads contiguous [64, 8] blocks; the rest (2-bit 2:4, shapes that do not tile) in row order.

Same contract as kernels/sbmm_triton.py (kernels/sbmm.py is the wrapper). The data path differs: Δ is the
A operand of mma.m16n8k16 (rows of Δ = MMA M, tokens = MMA N), and the K order inside a tile is permuted,
identically for x and Δ, so that
  - the values a thread expands from its own packed words are exactly its A fragments, and
  - its B fragments (x) are consecutive registers of plain 16-byte loads.
A K tile is NW = 8 words per row. With t = lane % 4 (position in the quad), a thread owns words w = 2t + r
(r < 2) of its rows; a word holds G = DPW / 4 groups of 4 dense columns:
  dense column (of Δ and x) = DPW * w + 4 * g + 2 * h + e      (g < G, h < 2, e < 2)
  MMA k                     = 16 * (g + G * r) + 8 * h + 2 * t + e
so per k16 chunk a thread's A registers are the (d0 d1) and (d2 d3) half2 pairs of one group, and its B
registers are 4 contiguous halves of x. The reshape/permute below only renames registers
(`convert_layout(..., assert_trivial=True)` checks that at compile time); nothing touches shared memory.
The PTX expander is kernels/sbmm_asm.py; docs/kernels.md has the instruction counts and timings.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from kernels import layout
from kernels.sbmm_triton import SEGMENT_ARGS, SEGMENT_POINTERS


WORDS_PER_TILE = 8  # 4 lanes x 2 words: one K tile is 8 * DPW dense columns (128 at 4-bit, 256 at 2-bit)
_TILE_ROWS = gl.constexpr(layout.TILE_ROWS)  # rows of one tile-major block of words (kernels/layout.py)
assert WORDS_PER_TILE == layout.TILE_WORDS, "a K step at 4-bit geometry must be one tile-major block row"


@gluon.jit
def _find_tile(pid_t, seg_starts_ptr, seg_slots_ptr, num_segments, num_slots, BLOCK_M: gl.constexpr,
               MAX_SEGS: gl.constexpr, LAYOUT: gl.constexpr):
    """Tile number -> (first row, end row, slot); end <= first when the program has no tile."""
    i = gl.arange(0, MAX_SEGS, layout=LAYOUT)
    live = i < num_segments
    lo = gl.load(seg_starts_ptr + i, mask=live, other=0)
    hi = gl.load(seg_starts_ptr + i + 1, mask=live, other=0)
    slot = gl.load(seg_slots_ptr + i, mask=live, other=-1)
    has_delta = live & (slot >= 0) & (slot < num_slots) & (hi > lo)
    num_tiles = gl.where(has_delta, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    ends = gl.associative_scan(num_tiles, 0, _add)
    seg = gl.sum((ends <= pid_t).to(gl.int32), 0)
    mine = i == seg
    tile = pid_t - gl.sum(gl.where(mine, ends - num_tiles, 0), 0)
    m_start = gl.sum(gl.where(mine, lo, 0), 0) + tile * BLOCK_M
    m_end = gl.minimum(gl.sum(gl.where(mine, hi, 0), 0), m_start + BLOCK_M)
    return m_start, m_end, gl.sum(gl.where(mine, slot, 0), 0)


@gluon.jit
def _split_range(K: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr):
    """This program's K range [k_lo, k_hi): split s = program_id(2) takes K tiles [s * STEPS_PER, min((s + 1) *
    STEPS_PER, STEPS)); the wrappers pick SPLIT_K so that no split is empty."""
    STEPS: gl.constexpr = K // BLOCK_K
    STEPS_PER: gl.constexpr = (STEPS + SPLIT_K - 1) // SPLIT_K
    k_lo = gl.program_id(2) * (STEPS_PER * BLOCK_K)
    return k_lo, gl.minimum(k_lo + STEPS_PER * BLOCK_K, K)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _cat(a, b):
    """[R, C, L] x2 -> [R, C, 2L] with a at even and b at odd positions."""
    j = gl.join(a, b)
    return gl.reshape(j, [j.shape[0], j.shape[1], j.shape[2] * 2])


@gluon.jit
def _interleave(o, LO: gl.constexpr, NUM: gl.constexpr):
    """Tuple of NUM [R, C] tensors -> [R, C, NUM]; position p holds o[LO + bitreverse(p)]."""
    if NUM == 2:
        return gl.join(o[LO], o[LO + 1])
    else:
        return _cat(_interleave(o, LO, NUM // 2), _interleave(o, LO + NUM // 2, NUM // 2))


@gluon.jit
def _expand(qw, mw, s2, z2, zq2, ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, DTYPE: gl.constexpr,
            BITS: gl.constexpr, ASYM: gl.constexpr):
    """Words [BN, NW] -> [BN, NW, DPW] in DTYPE, position = dense column inside the word."""
    if ASYM:
        args = [qw, mw, s2, z2, zq2]
    else:
        args = [qw, mw, s2, z2]
    if BITS == 4:
        if DTYPE == gl.float16:
            o = gl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(gl.float16,) * 16, is_pure=True, pack=1)
        else:
            o = gl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(gl.bfloat16,) * 16, is_pure=True, pack=1)
        w = _interleave(o, 0, 16)
    else:
        if DTYPE == gl.float16:
            o = gl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(gl.float16,) * 32, is_pure=True, pack=1)
        else:
            o = gl.inline_asm_elementwise(ASM, CONSTRAINTS, args, dtype=(gl.bfloat16,) * 32, is_pure=True, pack=1)
        w = _interleave(o, 0, 32)
    return w


@gluon.jit
def _load_scales(scale_rows, zero_rows, k0, offs_w, mask_n, ASYM: gl.constexpr, SCALE_MODE: gl.constexpr,
                 GROUP_SIZE: gl.constexpr, DPW: gl.constexpr, EVEN_N: gl.constexpr, RAW: gl.constexpr):
    """Scale (and zero point) of each word of the K tile at k0: [BN, 1] or [BN, NW] fp16. RAW (unscaled
    expansion): the scale of the tile's one group as [BN] in the accumulator's row layout (scale_rows and
    mask_n are in that layout then; SCALE_MODE 0 has GROUP_SIZE = K, so it reads the row scale)."""
    if RAW:
        if EVEN_N:
            sc = gl.load(scale_rows + k0 // GROUP_SIZE)
        else:
            sc = gl.load(scale_rows + k0 // GROUP_SIZE, mask=mask_n, other=0.0)
        zc = sc
    else:
        if SCALE_MODE == 0:
            ptr_s = scale_rows[:, None]
            ptr_z = zero_rows[:, None]
            mask = mask_n[:, None]
        elif SCALE_MODE == 1:
            ptr_s = scale_rows[:, None] + k0 // GROUP_SIZE
            ptr_z = zero_rows[:, None] + k0 // GROUP_SIZE
            mask = mask_n[:, None]
        else:
            g = ((k0 + offs_w * DPW) // GROUP_SIZE)[None, :]
            ptr_s = scale_rows[:, None] + g
            ptr_z = zero_rows[:, None] + g
            mask = mask_n[:, None] & (g >= 0)
        if EVEN_N:
            sc = gl.load(ptr_s)
            zc = gl.load(ptr_z) if ASYM else sc
        else:
            sc = gl.load(ptr_s, mask=mask, other=0.0)
            zc = gl.load(ptr_z, mask=mask, other=0.0) if ASYM else sc
    return sc, zc


@gluon.jit
def _load_tile(x_tile, qw_tile, meta_tile, scale_rows, zero_rows, k0, offs_w, mask_n, mask_s, ASYM: gl.constexpr,
               SCALE_MODE: gl.constexpr, GROUP_SIZE: gl.constexpr, DPW: gl.constexpr, EVEN_N: gl.constexpr,
               HAS_META: gl.constexpr, RAW: gl.constexpr, TILED: gl.constexpr):
    """Everything one K step reads: x [BM, BK], words and meta [BN, NW] (dense2 words: no meta), scales
    (scale_rows / mask_s: in the word layout, or the accumulator's with RAW)."""
    x = gl.load(x_tile + k0)
    if TILED:  # tile-major: the next K step of every row is the next [TILE_ROWS, NW] block of its block row
        step = k0 // DPW * _TILE_ROWS
    else:
        step = k0 // DPW
    if EVEN_N:
        qw = gl.load(qw_tile + step)
    else:
        qw = gl.load(qw_tile + step, mask=mask_n[:, None], other=0)
    if not HAS_META:
        mw = qw  # the dense2 expander ignores its meta input
    elif EVEN_N:
        mw = gl.load(meta_tile + step).to(gl.int32)
    else:
        mw = gl.load(meta_tile + step, mask=mask_n[:, None], other=0).to(gl.int32)
    sc, zc = _load_scales(scale_rows, zero_rows, k0, offs_w, mask_s, ASYM, SCALE_MODE, GROUP_SIZE, DPW, EVEN_N, RAW)
    return x, qw, mw, sc, zc


@gluon.jit
def _half2_bits(v, DTYPE: gl.constexpr):
    """fp16 tensor -> int32 holding the DTYPE bits of v in both 16-bit lanes."""
    h = v.to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return h | (h << 16)


@gluon.jit(do_not_specialize=SEGMENT_ARGS, do_not_specialize_on_alignment=SEGMENT_POINTERS)
def _sbmm_gluon_kernel(
    # activations x: [T, K], output y: [T, N]; unit stride along K / N
    x_ptr, y_ptr, stride_xm, stride_ym,
    # slot-stacked packed delta, canonical layout (meta viewed as one element per qweight word)
    qw_ptr, meta_ptr, scales_ptr, zeros_ptr,
    stride_qs, stride_qn, stride_ms, stride_mn, stride_ss, stride_sn,
    # segments: rows seg_starts[s]:seg_starts[s+1] use slot seg_slots[s] (-1: none)
    seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
    # split-K (SPLIT_K > 1): fp32 partials ws [SPLIT_K, T, N], one arrival counter per output tile (zeroed)
    ws_ptr, counters_ptr, stride_wss,
    N, K: gl.constexpr, GROUP_SIZE: gl.constexpr, EVEN_N: gl.constexpr,
    BITS: gl.constexpr, ASYM: gl.constexpr, SCALE_MODE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MAX_SEGS: gl.constexpr,
    ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, Z2: gl.constexpr,
    L_WORDS: gl.constexpr, L_X: gl.constexpr, L_SEG: gl.constexpr, PREFETCH: gl.constexpr,
    SPLIT_K: gl.constexpr, HAS_META: gl.constexpr, RAW: gl.constexpr, TILED: gl.constexpr,
):
    DPW: gl.constexpr = 64 // BITS
    NW: gl.constexpr = 8
    BLOCK_K: gl.constexpr = NW * DPW
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)

    m_start, m_end, slot = _find_tile(gl.program_id(1), seg_starts_ptr, seg_slots_ptr, num_segments, num_slots,
                                      BLOCK_M, MAX_SEGS, L_SEG)
    if m_end <= m_start:
        return
    n0 = gl.program_id(0) * BLOCK_N
    pid_k = gl.program_id(2)
    k_lo, k_hi = _split_range(K, BLOCK_K, SPLIT_K)
    slot64 = slot.to(gl.int64)
    # packed words: [BN, NW] in L_WORDS (lane quad position t owns words 2t, 2t+1)
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_WORDS))
    offs_w = gl.arange(0, NW, layout=gl.SliceLayout(0, L_WORDS))
    mask_n = offs_n < N  # unused when EVEN_N: no predicates (and no zero-fill moves) on packed loads
    if TILED:  # [N/64, K/BLOCK_K, 64, NW] blocks (kernels/layout.py; meta: its int16 view), N a multiple of 64
        block_rows = (offs_n // _TILE_ROWS) * (_TILE_ROWS * (K // DPW)) + (offs_n % _TILE_ROWS) * NW
        qw_tile = qw_ptr + slot64 * stride_qs + block_rows[:, None] + offs_w[None, :]
        meta_tile = meta_ptr + slot64 * stride_ms + block_rows[:, None] + offs_w[None, :]
    else:
        qw_tile = qw_ptr + slot64 * stride_qs + offs_n[:, None] * stride_qn + offs_w[None, :]
        meta_tile = meta_ptr + slot64 * stride_ms + offs_n[:, None] * stride_mn + offs_w[None, :]
    if RAW:  # unscaled expansion (dense2, one scale per row or per K tile): scales go to the accumulator rows
        offs_sn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        mask_s = offs_sn < N
    else:
        offs_sn = offs_n
        mask_s = mask_n
    scale_rows = scales_ptr + slot64 * stride_ss + offs_sn * stride_sn
    zero_rows = zeros_ptr + slot64 * stride_ss + offs_sn * stride_sn
    # activations: [BM, BK] in L_X (dense order, each lane 2*DPW contiguous values per row); rows past the
    # tile re-read its last row (always in bounds) and their results are never stored
    offs_xm = gl.minimum(m_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, L_X)), m_end - 1)
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, L_X))
    x_tile = x_ptr + offs_xm[:, None] * stride_xm + offs_xk[None, :]
    z2 = gl.full([BLOCK_N, 1], Z2, gl.int32, layout=L_WORDS)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
    x, qw, mw, sc, zc = _load_tile(x_tile, qw_tile, meta_tile, scale_rows, zero_rows, k_lo, offs_w, mask_n, mask_s,
                                   ASYM, SCALE_MODE, GROUP_SIZE, DPW, EVEN_N, HAS_META, RAW, TILED)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:  # next tile's loads in flight while this one is expanded (last step re-reads itself)
            k_next = gl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)
            x_n, qw_n, mw_n, sc_n, zc_n = _load_tile(x_tile, qw_tile, meta_tile, scale_rows, zero_rows, k_next,
                                                     offs_w, mask_n, mask_s, ASYM, SCALE_MODE, GROUP_SIZE, DPW,
                                                     EVEN_N, HAS_META, RAW, TILED)
        else:
            x, qw, mw, sc, zc = _load_tile(x_tile, qw_tile, meta_tile, scale_rows, zero_rows, k0, offs_w, mask_n,
                                           mask_s, ASYM, SCALE_MODE, GROUP_SIZE, DPW, EVEN_N, HAS_META, RAW, TILED)
        if RAW:  # the expander ignores its scale / zero inputs
            w = _expand(qw, qw, qw, qw, qw, ASM, CONSTRAINTS, DTYPE, BITS, ASYM)
        else:
            w = _expand(qw, mw, _half2_bits(sc, DTYPE), z2, _half2_bits(zc, DTYPE), ASM, CONSTRAINTS, DTYPE, BITS,
                        ASYM)  # [BN, NW, DPW]
        # dense column (t, r, g, h, e) -> MMA k (r, g, h, t, e); registers only
        w = gl.reshape(w, [BLOCK_N, 4, 2, DPW // 4, 2, 2])
        w = gl.permute(w, [0, 2, 3, 4, 1, 5])
        a_op = gl.convert_layout(gl.reshape(w, [BLOCK_N, BLOCK_K]), A_OP, assert_trivial=True)
        xt = gl.reshape(x, [BLOCK_M, 4, 2, DPW // 4, 2, 2])
        xt = gl.permute(xt, [2, 3, 4, 1, 5, 0])
        b_op = gl.convert_layout(gl.reshape(xt, [BLOCK_K, BLOCK_M]), B_OP, assert_trivial=True)
        if RAW and SCALE_MODE == 1:  # this tile's group scale on its product, fp32
            part = mma_v2(a_op, b_op, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA))
            acc += part * sc.to(gl.float32)[:, None]
        else:
            acc = mma_v2(a_op, b_op, acc)  # acc: [BN, BM] = Δ_tile @ x_tile.T
        if PREFETCH:
            x, qw, mw, sc, zc = x_n, qw_n, mw_n, sc_n, zc_n
    if RAW and SCALE_MODE == 0:  # one scale per row: applied once
        acc = acc * sc.to(gl.float32)[:, None]
    offs_yn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    offs_ym = m_start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    y_ptrs = y_ptr + offs_ym[None, :] * stride_ym + offs_yn[:, None]
    ymask = (offs_ym < m_end)[None, :] & (offs_yn < N)[:, None]
    if SPLIT_K == 1:
        y = gl.load(y_ptrs, mask=ymask, other=0.0)
        gl.store(y_ptrs, (y.to(gl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        # every split stores its fp32 partial; the last to arrive at the tile's counter adds all partials in
        # split order (deterministic, whichever arrives last) to y and zeroes the counter again (sbmm.Workspace
        # reuses counter buffers without a memset). Release: the barrier orders the CTA's
        # stores before the counter update (acq_rel at GPU scope); acquire: partials are read through L2.
        ws_rows = ws_ptr + offs_ym[None, :] * N + offs_yn[:, None]
        gl.store(ws_rows + pid_k * stride_wss, acc, mask=ymask)
        gl.thread_barrier()
        tile = gl.program_id(0) * gl.num_programs(1) + gl.program_id(1)
        arrived = gl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            gl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed", scope="gpu")  # left zeroed for the next launch
            total = gl.load(ws_rows, mask=ymask, other=0.0, cache_modifier=".cg")
            for s in gl.static_range(1, SPLIT_K):
                total += gl.load(ws_rows + s * stride_wss, mask=ymask, other=0.0, cache_modifier=".cg")
            y = gl.load(y_ptrs, mask=ymask, other=0.0)
            gl.store(y_ptrs, (y.to(gl.float32) + total).to(y_ptr.dtype.element_ty), mask=ymask)


def word_layout(block_n: int, num_warps: int) -> gl.DistributedLinearLayout:
    """[BN, 8] words as the MMA A operand wants them: lane (row g, quad position t) owns words 2t, 2t+1 of
    rows g and g+8; warps take 16-row slices, registers repeat over BN / (16 * num_warps)."""
    rows_per_cta = 16 * num_warps
    assert block_n % rows_per_cta == 0, f"BLOCK_N must be a multiple of {rows_per_cta}"
    reg = [[0, 1], [8, 0]] + [[rows_per_cta << i, 0] for i in range((block_n // rows_per_cta).bit_length() - 1)]
    lane = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[block_n, 8])


def x_layout(bits: int, block_m: int, num_warps: int) -> gl.DistributedLinearLayout:
    """[BM, BK] activations in dense order: lane (token g, t) holds columns 2t*DPW .. 2t*DPW + 2*DPW - 1 of
    tokens g, g+8, ..., one 16-byte load per 8 values; every warp loads the whole tile (it is the B operand)."""
    assert block_m % 8 == 0 and block_m & (block_m - 1) == 0, "BLOCK_M must be 8, 16, 32 or 64"
    dpw = 64 // bits
    reg = [[0, 1 << i] for i in range((2 * dpw).bit_length() - 1)]
    reg += [[8 << i, 0] for i in range((block_m // 8).bit_length() - 1)]
    lane = [[0, 2 * dpw], [0, 4 * dpw], [1, 0], [2, 0], [4, 0]]
    warp = [[0, 0] for _ in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[block_m, 8 * dpw])


def seg_layout(num_warps: int) -> gl.BlockedLayout:
    """1-D layout for the per-segment vectors of the tile search."""
    return gl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[num_warps], order=[0])
