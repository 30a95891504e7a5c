"""Prefill-sized segments on sp2 slot words, Hopper only (Gluon): Δ made by selection MMAs in the A layout of a
warpgroup MMA, stored to shared memory, and multiplied with x's tiles there (docs/kernels.md run 27, "Next steps"
item 6).

Why: SBMM (kernels/sbmm_spmma2.py) expands every delta word again for each 16-row block, so a 128-row prefill
segment costs it ~2.5x the base GEMM of its shape (docs/serving.md, session 23). This kernel expands each word
once per 64-128 rows of x.

How: a program owns WG 64-row blocks of Δ (warpgroup w: block pid_n WG + w of the sp2 order, one warp per 16-row
block) and BLOCK_M rows of x of one segment, over K in 128-column chunks (two words a lane). Per 32-column block j
of a 256-column step (mma.sp j of the sp2 order: word j // 2 of the lane, selector j % 2):
1. the lane's word is expanded into the mma.sp A registers (the SBMM word expander, `EXPAND`);
2. four selection MMAs (D = A_sparse @ B_p, B_p[k, n] = 1 where k = n + 8p, an fp16 accumulator: exact, each
   output is one Δ value or 0) give lane (g, t) rows g and g + 8 at columns 2t, 2t + 1 of k offsets
   8 (p % 2) + 16 (p // 2): its four registers of pack p of a [64, 32] `warpgroup_mma` A operand
   (DotOperandLayout of NVMMA v3, k_width 2: register bits (k + 1, row + 8, k + 8, k + 16), lane bits (k + 2,
   k + 4, row + 1, row + 2, row + 4)), each Δ value at its own column, so x needs no permutation;
3. scaled in fp16 (one rounding, as fp32 and then fp16), they go to shared memory (two buffers: a chunk expands
   while the last chunk's MMAs run);
4. x's chunk arrives by cp.async, STAGES - 2 chunks ahead, and acc[NR, BLOCK_M] += A @ x^T by asynchronous
   warpgroup MMAs.
y[rows, NR columns] += acc^T at the end (y rounded once). Two barriers a chunk.

What did not work (docs/kernels.md run 27): A kept in registers with its MMA in flight (ptxas reuses the
registers the packed A operands of in-flight MMAs sit in, and waits for them first); one A buffer (ptxas moves
the wait above the expansion); one warpgroup a program (it re-reads x from L2 for each 64 output columns, 64 FLOP
a byte, ~250 TFLOPS); the first, block-at-a-time form (x through registers, a synchronous MMA per 32 columns:
about SBMM's speed).

On an H200 (BLOCK_M 128, WG 2, 3 stages; sm_90: 303 instructions a lane per chunk, 209 registers, 164 KB of
shared memory) it is 1.15-1.6x faster than SBMM from 128 rows a delta at 96+ programs and 1.7-2.4x the base GEMM
(bench/results/sp2-prefill-s24d-*.json). kernels/delta_linear.py routes segments of `SP2_PREFILL_ROWS` (256)
rows and more to it, with 64-row blocks where those are cheaper. fp16 only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from kernels import sbmm
from kernels.sbmm_dequant import ONE as ONE_BITS  # 1.0 as a 16-bit pattern
from kernels.sbmm_plan import capability
from kernels.sp2_prefill import block_table, check_operands, segments_run
from kernels.spmma_layout import SP2_STEP

def selection_ptx(dtype: str, selector: int, out16: bool = False) -> tuple[str, str]:
    """(PTX, constraints) of one selection mma.sp with pack=4: outputs $0..$3 (d0..d3, fp32), or with out16 $0, $1
    (d0 d1 and d2 d3 as fp16 pairs, an fp16 accumulator: exact, each output is one Δ value or 0); inputs a0..a3,
    b0..b3 and meta, four copies each (the pack's four elements, all equal): input i's first copy is
    $(n + 4i), n the number of outputs."""
    n = 2 if out16 else 4
    a = ", ".join(f"${n + 4 * i}" for i in range(4))
    b = ", ".join(f"${n + 16 + 4 * i}" for i in range(4))
    if out16:
        ptx = ("{ .reg .b32 %z; mov.b32 %z, 0; "
               f"mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f16.{dtype}.{dtype}.f16 "
               f"{{$0, $1}}, {{{a}}}, {{{b}}}, {{%z, %z}}, ${n + 32}, {selector}; }}")
        return ptx, ",".join(["=r"] * 2 + ["r"] * 36)
    ptx = ("{ .reg .f32 %z; mov.f32 %z, 0f00000000; "
           f"mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{dtype}.{dtype}.f32 "
           f"{{$0, $1, $2, $3}}, {{{a}}}, {{{b}}}, {{%z, %z, %z, %z}}, ${n + 32}, {selector}; }}")
    return ptx, ",".join(["=f"] * 4 + ["r"] * 36)


@gluon.jit
def _select_word(w, e, b0, b1, b2, b3, scale, EXPAND: gl.constexpr, CONSTRAINTS_E: gl.constexpr,
                 SEL0: gl.constexpr, SEL1: gl.constexpr, CONSTRAINTS_S: gl.constexpr):
    """One word's two 32-column blocks (selectors 0 and 1 of its mma.sp pair), unscaled, in scale's dtype."""
    a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(EXPAND, CONSTRAINTS_E, [w], dtype=(gl.int32,) * 8,
                                                               is_pure=True, pack=1)
    d0 = gl.inline_asm_elementwise(SEL0, CONSTRAINTS_S, [a0, a1, a2, a3, b0, b1, b2, b3, e], dtype=scale.dtype,
                                   is_pure=True, pack=4)
    d1 = gl.inline_asm_elementwise(SEL1, CONSTRAINTS_S, [a4, a5, a6, a7, b0, b1, b2, b3, e], dtype=scale.dtype,
                                   is_pure=True, pack=4)
    return d0, d1


@gluon.jit
def _expand_chunk(q_lane, m_lane, at, b0, b1, b2, b3, scale, EXPAND: gl.constexpr, CONSTRAINTS_E: gl.constexpr,
                  SEL0: gl.constexpr, SEL1: gl.constexpr, CONSTRAINTS_S: gl.constexpr):
    """The four A operands (fp16, scaled) of a 128-column chunk whose two words a lane start at word `at`, the
    selection MMAs giving scale's dtype (fp32, or fp16 with SEL0/SEL1 from `selection_ptx(out16=True)`). Words
    and meta are loaded here, never carried by a loop: each lane's 16 copies would stop being one value to the
    compiler, which then expands the word once per copy."""
    w0 = gl.load(q_lane + at)
    e0 = gl.load(m_lane + at)
    w1 = gl.load(q_lane + at + 1)
    e1 = gl.load(m_lane + at + 1)
    d0, d1 = _select_word(w0, e0, b0, b1, b2, b3, scale, EXPAND, CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S)
    d2, d3 = _select_word(w1, e1, b0, b1, b2, b3, scale, EXPAND, CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S)
    return (d0 * scale).to(gl.float16), (d1 * scale).to(gl.float16), (d2 * scale).to(gl.float16), \
        (d3 * scale).to(gl.float16)


@gluon.jit
def _prefetch(q_run, m_run, ahead, LEVEL: gl.constexpr):
    """Prefetch a step's words and meta (one 16-byte run a lane) to L2 (LEVEL 1) or L1 (2)."""
    ASM: gl.constexpr = "prefetch.global.L1 [$1]; mov.u32 $0, 0;" if LEVEL == 2 else \
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;"
    gl.inline_asm_elementwise(ASM, "=r,l", [q_run + ahead], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise(ASM, "=r,l", [m_run + ahead], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _lane_operands(q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, block0, steps_per_row_block,
                   ONE: gl.constexpr, NR: gl.constexpr, A_L: gl.constexpr, W_L: gl.constexpr):
    """What a program's expansion reads, for NR delta rows from 64-row block `block0` of the sp2 order on, in the A
    layout A_L (its [NR, 32] operand: rows, and the columns of one 32-column block): (word pointers, meta
    pointers, B_0..B_3, row-scale pointers [NR, 1], and per lane of W_L the start of its 16-byte run of a step's
    words and meta, for `_prefetch`)."""
    row = gl.expand_dims(gl.arange(0, NR, layout=gl.SliceLayout(1, A_L)), 1)  # [NR, 1]
    kk = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, A_L)), 0)  # [1, 32]
    g = row % 8
    t = (kk % 8) // 2
    p = kk // 8
    word_at = (block0 + row // 64) * steps_per_row_block * 512 + (row % 64 // 16) * 128 + g * 16 + t * 4
    # B_p of the lane: B_p[k, n] = 1 where k = n + 8p, so D[:, n] = A_dense[:, n + 8p]. Lane (g, t) holds B's column
    # g at k = 8m + 2t + h in register m, half h: 1.0 in register p, half g % 2, where t = g // 2.
    one = (t == g // 2).to(gl.int32) * (ONE << (16 * (g % 2)))  # [NR, 32]
    lane = gl.arange(0, 2 * NR, layout=W_L)
    run_at = (block0 + lane // 128) * steps_per_row_block * 512 + 4 * (lane % 128)  # words 4l..4l+3 of a step
    return (q_ptr + slot * stride_qslot + word_at, m_ptr + slot * stride_qslot + word_at,
            gl.where(p == 0, one, 0), gl.where(p == 1, one, 0), gl.where(p == 2, one, 0), gl.where(p == 3, one, 0),
            s_ptr + slot * stride_sslot + (block0 * 64 + row) * stride_sn,
            q_ptr + slot * stride_qslot + run_at, m_ptr + slot * stride_qslot + run_at)


@gluon.jit
def _copy_x_chunk(x_smem, x_at, c, ok, STAGES: gl.constexpr):
    """cp.async x's 128-column chunk c (rows where `ok`) into its four buffers, as one commit group."""
    async_copy.async_copy_global_to_shared(x_smem.index(c % STAGES), x_at + c * 128, mask=ok)
    async_copy.commit_group()


@gluon.jit
def _chunk_scale(s_rows, scale, c, K: gl.constexpr, GROUP_SIZE: gl.constexpr):
    """Chunk c's row scales (GROUP_SIZE a multiple of 128; row scales: the same all along K)."""
    if GROUP_SIZE < K:
        scale = gl.load(s_rows + (gl.minimum(c, K // 128 - 1) * 128) // GROUP_SIZE).to(scale.dtype)
    return scale


@gluon.jit
def _sp2_wgmma_pipe_kernel(
    x_ptr, y_ptr, stride_x, stride_y,
    q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn,
    blocks_ptr, steps_per_row_block,
    K: gl.constexpr, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, ONE: gl.constexpr,
    EXPAND: gl.constexpr, CONSTRAINTS_E: gl.constexpr, SEL0: gl.constexpr, SEL1: gl.constexpr,
    CONSTRAINTS_S: gl.constexpr, STAGES: gl.constexpr, PREFETCH: gl.constexpr, F16_SELECT: gl.constexpr,
    WG: gl.constexpr,
):
    """The kernel (module docstring). PREFETCH: the next step's words and meta are prefetched to L2 (1) or L1 (2)
    one step ahead; their loads stay in the iteration (`_expand_chunk`)."""
    NR: gl.constexpr = 64 * WG  # delta rows (y columns) of a program: warpgroup w the 64-row block pid_n WG + w
    MMA_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_L, k_width=2)
    X_L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4 * WG, 1], [1, 0])  # 16-byte copies of x
    X_S: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
    W_L: gl.constexpr = gl.BlockedLayout([1], [32], [4 * WG], [0])  # one lane, one 16-byte run of a step's words

    pid_n = gl.program_id(0)
    pid_b = gl.program_id(1)
    r0 = gl.load(blocks_ptr + 3 * pid_b)
    r1 = gl.load(blocks_ptr + 3 * pid_b + 1)
    slot = gl.load(blocks_ptr + 3 * pid_b + 2).to(gl.int64)
    n0 = pid_n * NR

    q_lane, m_lane, b0, b1, b2, b3, s_rows, q_run, m_run = _lane_operands(
        q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, pid_n * WG, steps_per_row_block, ONE, NR,
        A_L, W_L)

    # x's chunk as [4 blocks x BLOCK_M rows, 32 columns], one copy op (four would each get a barrier)
    xi = gl.expand_dims(gl.arange(0, 4 * BLOCK_M, layout=gl.SliceLayout(1, X_L)), 1)  # [4 BM, 1]: block, row
    xk = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, X_L)), 0)  # [1, 32]
    x_ok = (r0 + xi % BLOCK_M) < r1
    x_at = x_ptr + (r0 + xi % BLOCK_M).to(gl.int64) * stride_x + 32 * (xi // BLOCK_M) + xk
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, 4 * BLOCK_M, 32], X_S)  # chunk c: buffer c % STAGES

    CHUNKS: gl.constexpr = K // 128
    # x chunk c is copied AHEAD chunks early, into a buffer whose last reader (chunk c - STAGES) is done
    AHEAD: gl.constexpr = STAGES - 2
    for c in gl.static_range(AHEAD):  # the first chunks, one commit group each (empty past the end)
        _copy_x_chunk(x_smem, x_at, c, x_ok & (c < CHUNKS), STAGES)
    # chunk c's four [NR, 32] A tiles: index c % 2 of four buffers (one buffer, four stores would each get a barrier)
    a_smem0 = gl.allocate_shared_memory(gl.float16, [2, NR, 32], X_S)
    a_smem1 = gl.allocate_shared_memory(gl.float16, [2, NR, 32], X_S)
    a_smem2 = gl.allocate_shared_memory(gl.float16, [2, NR, 32], X_S)
    a_smem3 = gl.allocate_shared_memory(gl.float16, [2, NR, 32], X_S)

    # A chunk c: expanded in registers while chunk c - 1's MMAs run, stored to A buffer c % 2 (chunk c - 2's MMAs,
    # its last reader, are done), then its MMAs issued with A and x both from shared memory, and all but they
    # waited for. Two things that do not overlap (ptxas moves the wait for the MMAs in flight above the expansion):
    # A in registers (ptxas reuses the registers the packed A operands of MMAs in flight sit in) and one A buffer
    # (waiting for chunk c - 1's MMAs before its store).
    # F16_SELECT: selection MMAs give fp16 (exact), scaled in fp16 (one rounding, the same as fp32 then fp16)
    if F16_SELECT:
        scale = gl.load(s_rows).to(gl.float16)
    else:
        scale = gl.load(s_rows).to(gl.float32)  # chunk 0's (a whole row's when GROUP_SIZE == K)
    acc = gl.zeros([NR, BLOCK_M], gl.float32, layout=MMA_L)
    for c in range(0, CHUNKS):
        # first, so that Triton's barrier before it (its buffer was chunk c - 2's) also covers the A stores below
        _copy_x_chunk(x_smem, x_at, c + AHEAD, x_ok & (c + AHEAD < CHUNKS), STAGES)
        if PREFETCH:
            if c % 2 == 0:  # the next step's words
                _prefetch(q_run, m_run, gl.minimum(c // 2 + 1, CHUNKS // 2 - 1) * 512, PREFETCH)
        o0, o1, o2, o3 = _expand_chunk(q_lane, m_lane, (c // 2) * 512 + 2 * (c % 2), b0, b1, b2, b3, scale, EXPAND,
                                       CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S)
        scale = _chunk_scale(s_rows, scale, c + 1, K, GROUP_SIZE)
        a0 = a_smem0.index(c % 2)
        a1 = a_smem1.index(c % 2)
        a2 = a_smem2.index(c % 2)
        a3 = a_smem3.index(c % 2)
        a0.store(o0)
        a1.store(o1)
        a2.store(o2)
        a3.store(o3)
        async_copy.wait_group(AHEAD)  # this thread's copies of chunk c are in, and with the fence its A stores are
        fence_async_shared()  # the MMA's to read (the barrier that makes them everyone's is Triton's)
        xs = x_smem.index(c % STAGES)
        acc = warpgroup_mma(a0, xs.slice(0, BLOCK_M).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a1, xs.slice(BLOCK_M, BLOCK_M).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a2, xs.slice(2 * BLOCK_M, BLOCK_M).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a3, xs.slice(3 * BLOCK_M, BLOCK_M).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(4, deps=[acc])  # chunk c - 1's are done (a plain tensor for the loop to carry)
    acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)

    yr = gl.expand_dims(gl.arange(0, NR, layout=gl.SliceLayout(1, MMA_L)), 1)
    yc = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA_L)), 0)
    ok = (r0 + yc) < r1
    y_at = y_ptr + (r0 + yc).to(gl.int64) * stride_y + n0 + yr
    yv = gl.load(y_at, mask=ok, other=0.0)
    gl.store(y_at, (yv.to(gl.float32) + acc).to(yv.dtype), mask=ok)


@functools.lru_cache(maxsize=64)
def constexprs(k: int, group_size: int, block_m: int, dtype: torch.dtype = torch.float16, stages: int = 3,
               prefetch: int = 1, f16_select: bool = True, warpgroups: int = 1) -> dict:
    """The kernel's compile-time arguments (also scripts/sbmm_sass.py's)."""
    from kernels import sbmm_spmma2

    if dtype != torch.float16:
        raise ValueError("sp2_wgmma takes fp16 activations only (x's shared-memory tile is fp16)")
    if stages < 3:
        raise ValueError(f"sp2_wgmma needs 3+ x buffers (one copied ahead, two read by MMAs), got {stages}")
    expand, cons_e = sbmm_spmma2.expand_ptx("f16", "fma")
    sel0, cons_s = selection_ptx("f16", 0, f16_select)
    sel1, _ = selection_ptx("f16", 1, f16_select)
    return dict(K=k, GROUP_SIZE=group_size, BLOCK_M=block_m, ONE=ONE_BITS["f16"], EXPAND=expand,
                CONSTRAINTS_E=cons_e, SEL0=sel0, SEL1=sel1, CONSTRAINTS_S=cons_s, STAGES=stages,
                PREFETCH=int(prefetch), F16_SELECT=f16_select, WG=warpgroups)


def supported(x: torch.Tensor, n: int, k: int, group_size: int) -> bool:
    """Whether this kernel takes a launch: fp16 x on a Hopper GPU (sm_90), N a multiple of 64, K of 256, scale groups
    per row or a multiple of 128 columns (one scale per row of a pipelined chunk)."""
    return (x.is_cuda and x.dtype == torch.float16 and capability(x.device) == (9, 0)
            and n % 64 == 0 and k % SP2_STEP == 0 and (group_size == k or group_size % 128 == 0))


def sp2_wgmma(x: torch.Tensor, y: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
              starts: Sequence[int], slots: Sequence[int], block_m: int = 128,
              blocks: torch.Tensor | None = None, stages: int = 3, prefetch: int = 1, f16_select: bool = True,
              warpgroups: int = 2) -> int:
    """In place y[seg] += x[seg] @ dequant(Δ[slot(seg)]).T for every segment with a slot >= 0, as
    kernels/sp2_prefill.py `sp2_prefill` (same arguments, `blocks` too; CUDA sm_90, fp16). Returns how many
    segments it ran. Options: block_m (rows of x a program), stages (x buffers of 128 columns, 3+), prefetch (of
    the next step's words: 0 none, 1 to L2, 2 to L1), f16_select (fp16 selection MMAs and scaling), warpgroups
    (64-row blocks of Δ a program, sharing its x tiles; 1 where N is not a multiple of 64 of them)."""
    n, k, group_size = check_operands(x, y, qweight, meta, scales, slots)
    if not supported(x, n, k, group_size):
        raise ValueError(f"sp2_wgmma runs on Hopper GPUs (sm_90) with fp16 x, N a multiple of 64, K of {SP2_STEP}, "
                         f"scale groups per row or of a multiple of 128; got {x.device}, {x.dtype}, N={n}, K={k}, "
                         f"group {group_size}")
    if blocks is None:
        blocks = block_table(starts, slots, block_m, x.device)
    if blocks is None:
        return 0
    wg = warpgroups if n % (64 * warpgroups) == 0 else 1
    grid = (n // (64 * wg), blocks.numel() // 3, 1)
    args = (x, y, x.stride(0), y.stride(0), qweight, meta, scales, qweight.stride(0), scales.stride(0),
            scales.stride(1), blocks, k // SP2_STEP)
    const = (k, group_size, block_m, x.dtype, stages, prefetch, f16_select, wg)
    # eager prefill steps launch it per linear: skip Triton's per-call binding
    _LAUNCHES.launch(_sp2_wgmma_pipe_kernel, grid, args, const, 4 * wg, False, x.device, lambda: constexprs(*const))
    return segments_run(starts, slots)


_LAUNCHES = sbmm.LaunchCache()
