"""kernels/sp2_wgmma.py's prefill kernel, warp-specialized (Hopper, Gluon): two expansion partitions and one MMA
partition, so the expansion never waits on the MMAs' barriers and the MMA warps hold the accumulators alone.

Why: the pipelined kernel spends about as long expanding Δ as its MMAs take. At BLOCK_M 128 with two warpgroups
it needs 209 registers, so only 8 warps fit an SM, and each chunk puts every warp through two barriers and a wait
(docs/kernels.md run 27). Here a program (128 delta rows, BLOCK_M rows of x of one segment) has:
- two expansion partitions (4 warps each, `EXPAND_REGS` registers): partition e makes the A tiles of delta rows
  64e..64e + 63 for each 128-column chunk, stores them to A buffer c % A_STAGES, and arrives on `a_ready`; it
  waits on `a_empty` only before the store, so the next chunk's expansion overlaps the MMAs;
- the MMA partition (the default one, 4 warps, the rest of the registers): copies x's chunks by cp.async
  X_STAGES - 2 ahead, waits on `a_ready`, issues the chunk's four warpgroup MMAs (a [128, BLOCK_M] accumulator:
  two wgmma each, one per 64-row block) asynchronously, waits for the previous chunk's and arrives on its
  `a_empty`; at the end it adds the accumulator to y.
The expansion itself is the pipelined kernel's (`_expand_chunk`, fp16 selection MMAs and scaling).

Split-K: where a launch has few tiles (o / down at one 128-row block: 32 programs on 132 SMs) or an unlucky last
wave, `split_k` gives each tile SPLIT programs over chunk ranges, which add into y with fp16 atomics.

Measured (H200, docs/kernels.md run 28): BLOCK_M 128 is 1.37-2.15x faster than SBMM where segments fill whole
128-row blocks (1.07-1.25x at 192 rows), 5-20% faster than the pipelined kernel and ~1.5-2x the base GEMM
(bench/results/sp2-prefill-s25*.json). sm_90: 168 registers at launch, 128 / 128 / 256 after setmaxnreg, no
spills, 160 KB of shared memory at BLOCK_M 128.
kernels/delta_linear.py routes 128-row blocks here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from kernels import sbmm, sp2_wgmma
from kernels.sbmm_plan import sm_count
from kernels.sp2_prefill import block_table, check_operands, segments_run
from kernels.sp2_wgmma import _chunk_scale, _expand_chunk, _lane_operands, _prefetch
from kernels.spmma_layout import SP2_STEP

EXPAND_REGS = 128  # registers of each expansion partition's threads (setmaxnreg)
MAX_REGS = 168  # the kernel's registers at launch: 12 warps x 32 x 168 fit an SM's 64 K


@gluon.jit
def _expand_partition(q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, pid_n, steps_per_row_block,
                      c0, c1, a_smem0, a_smem1, a_smem2, a_smem3, a_ready, a_empty, E: gl.constexpr,
                      K: gl.constexpr, GROUP_SIZE: gl.constexpr, ONE: gl.constexpr, EXPAND: gl.constexpr,
                      CONSTRAINTS_E: gl.constexpr, SEL0: gl.constexpr, SEL1: gl.constexpr,
                      CONSTRAINTS_S: gl.constexpr, A_STAGES: gl.constexpr, PREFETCH: gl.constexpr,
                      DIAG: gl.constexpr):
    """Delta rows 64E..64E + 63 of the program's 128: the four [64, 32] A tiles of chunks c0..c1 - 1 into A buffer
    (c - c0) % A_STAGES, rows 64E.. of each tile. DIAG 1 (timing only): zero tiles, no expansion."""
    MMA_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_L, k_width=2)
    W_L: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    q_lane, m_lane, b0, b1, b2, b3, s_rows, q_run, m_run = _lane_operands(
        q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, pid_n * 2 + E, steps_per_row_block, ONE,
        64, A_L, W_L)
    CHUNKS: gl.constexpr = K // 128
    scale = _chunk_scale(s_rows, gl.load(s_rows).to(gl.float16), c0, K, GROUP_SIZE)
    for c in range(c0, c1):
        if PREFETCH:
            if c % 2 == 0:
                _prefetch(q_run, m_run, gl.minimum(c // 2 + 1, CHUNKS // 2 - 1) * 512, PREFETCH)
        if DIAG == 1:
            o0 = gl.zeros([64, 32], gl.float16, A_L)
            o1 = o0
            o2 = o0
            o3 = o0
        else:
            o0, o1, o2, o3 = _expand_chunk(q_lane, m_lane, (c // 2) * 512 + 2 * (c % 2), b0, b1, b2, b3, scale,
                                           EXPAND, CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S)
        scale = _chunk_scale(s_rows, scale, c + 1, K, GROUP_SIZE)
        s = (c - c0) % A_STAGES
        mbarrier.wait(a_empty.index(s), ((c - c0) // A_STAGES) & 1 ^ 1)  # its last chunk's MMAs are done
        a_smem0.index(s).slice(64 * E, 64).store(o0)
        a_smem1.index(s).slice(64 * E, 64).store(o1)
        a_smem2.index(s).slice(64 * E, 64).store(o2)
        a_smem3.index(s).slice(64 * E, 64).store(o3)
        fence_async_shared()
        mbarrier.arrive(a_ready.index(s))


@gluon.jit
def _copy_x(x_smem, x_ptr, stride_x, r0, r1, c, i, c1, BLOCK_M: gl.constexpr, X_STAGES: gl.constexpr):
    """cp.async x's 128-column chunk c (rows r0..r1; the program's i-th) into buffer i % X_STAGES as
    [4 blocks x BLOCK_M, 32], one commit group (empty from chunk c1 on)."""
    X_L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    xi = gl.expand_dims(gl.arange(0, 4 * BLOCK_M, layout=gl.SliceLayout(1, X_L)), 1)
    xk = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, X_L)), 0)
    ok = ((r0 + xi % BLOCK_M) < r1) & (c < c1)
    at = x_ptr + (r0 + xi % BLOCK_M).to(gl.int64) * stride_x + c * 128 + 32 * (xi // BLOCK_M) + xk
    async_copy.async_copy_global_to_shared(x_smem.index(i % X_STAGES), at, mask=ok)
    async_copy.commit_group()


@gluon.jit
def _mma_partition(x_ptr, y_ptr, stride_x, stride_y, r0, r1, n0, c0, c1, x_smem, a_smem0, a_smem1, a_smem2,
                   a_smem3, a_ready, a_empty, BLOCK_M: gl.constexpr, A_STAGES: gl.constexpr,
                   X_STAGES: gl.constexpr, SPLIT: gl.constexpr, DIAG: gl.constexpr):
    """x's chunks c0..c1 - 1, the MMAs (one [128, BLOCK_M] accumulator: 128 delta rows, two wgmma a block) and the
    epilogue: y += the accumulator, by atomic adds when SPLIT programs share the tile. DIAG 2 (timing only): no
    MMAs."""
    MMA_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    AHEAD: gl.constexpr = X_STAGES - 2  # x chunk c + AHEAD goes to chunk c - 2's buffer, whose MMAs are done
    for i in gl.static_range(AHEAD):
        _copy_x(x_smem, x_ptr, stride_x, r0, r1, c0 + i, i, c1, BLOCK_M, X_STAGES)
    acc = gl.zeros([128, BLOCK_M], gl.float32, layout=MMA_L)  # both 64-row blocks: two wgmma a block
    for i in range(0, c1 - c0):
        _copy_x(x_smem, x_ptr, stride_x, r0, r1, c0 + i + AHEAD, i + AHEAD, c1, BLOCK_M, X_STAGES)
        async_copy.wait_group(AHEAD)  # this thread's copies of chunk c0 + i are in
        fence_async_shared()
        s = i % A_STAGES
        mbarrier.wait(a_ready.index(s), (i // A_STAGES) & 1)
        if DIAG != 2:
            xs = x_smem.index(i % X_STAGES)
            acc = warpgroup_mma(a_smem0.index(s), xs.slice(0, BLOCK_M).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a_smem1.index(s), xs.slice(BLOCK_M, BLOCK_M).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(a_smem2.index(s), xs.slice(2 * BLOCK_M, BLOCK_M).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma(a_smem3.index(s), xs.slice(3 * BLOCK_M, BLOCK_M).permute((1, 0)), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(4, deps=[acc])  # chunk i - 1's are done: its A buffer is free
        mbarrier.arrive(a_empty.index((i + A_STAGES - 1) % A_STAGES), pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)
    # epilogue through x's buffers (free now): y's pointers for the whole [128, BLOCK_M] tile next to the
    # accumulator's 128 registers would spill, so y is updated 32 delta rows at a time
    C_S: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    c_smem = x_smem._reinterpret(gl.float32, [128, BLOCK_M], C_S)
    gl.thread_barrier()  # every warp's MMAs, the last readers of x's buffers, are done
    c_smem.store(acc)
    gl.thread_barrier()
    Y_L: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, 4], [0, 1])  # along delta rows: y's contiguous axis
    yr = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(1, Y_L)), 1)  # delta row (y column)
    yc = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, Y_L)), 0)  # x row
    ok = (r0 + yc) < r1
    y_rows = y_ptr + (r0 + yc).to(gl.int64) * stride_y + n0 + yr
    for i in gl.static_range(4):
        part = c_smem.slice(32 * i, 32).load(Y_L)
        if SPLIT == 1:
            yv = gl.load(y_rows + 32 * i, mask=ok, other=0.0)
            gl.store(y_rows + 32 * i, (yv.to(gl.float32) + part).to(yv.dtype), mask=ok)
        else:  # fp16 atomics: each split's part rounds once into y
            gl.atomic_add(y_rows + 32 * i, part.to(gl.float16), mask=ok, sem="relaxed")


@gluon.jit
def _sp2_wgmma_ws_kernel(
    x_ptr, y_ptr, stride_x, stride_y,
    q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn,
    blocks_ptr, steps_per_row_block,
    K: gl.constexpr, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, ONE: gl.constexpr,
    EXPAND: gl.constexpr, CONSTRAINTS_E: gl.constexpr, SEL0: gl.constexpr, SEL1: gl.constexpr,
    CONSTRAINTS_S: gl.constexpr, A_STAGES: gl.constexpr, X_STAGES: gl.constexpr, PREFETCH: gl.constexpr,
    EXPAND_REGS_: gl.constexpr, SPLIT: gl.constexpr, DIAG: gl.constexpr,
):
    X_S: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
    pid_n = gl.program_id(0)
    pid_b = gl.program_id(1)
    r0 = gl.load(blocks_ptr + 3 * pid_b)
    r1 = gl.load(blocks_ptr + 3 * pid_b + 1)
    slot = gl.load(blocks_ptr + 3 * pid_b + 2).to(gl.int64)
    CHUNKS: gl.constexpr = K // 128
    pid_k = gl.program_id(2)  # split-K: this program's chunks c0..c1 - 1
    c0 = pid_k * CHUNKS // SPLIT
    c1 = (pid_k + 1) * CHUNKS // SPLIT
    x_smem = gl.allocate_shared_memory(gl.float16, [X_STAGES, 4 * BLOCK_M, 32], X_S)
    # A block j of a chunk: one allocation each (stores into one would each get a barrier), [A_STAGES, 128, 32]
    a_smem0 = gl.allocate_shared_memory(gl.float16, [A_STAGES, 128, 32], X_S)
    a_smem1 = gl.allocate_shared_memory(gl.float16, [A_STAGES, 128, 32], X_S)
    a_smem2 = gl.allocate_shared_memory(gl.float16, [A_STAGES, 128, 32], X_S)
    a_smem3 = gl.allocate_shared_memory(gl.float16, [A_STAGES, 128, 32], X_S)
    a_ready = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(A_STAGES):
        mbarrier.init(a_ready.index(i), count=2)  # both expansion partitions
        mbarrier.init(a_empty.index(i), count=1)
    gl.warp_specialize([
        (_mma_partition, (x_ptr, y_ptr, stride_x, stride_y, r0, r1, pid_n * 128, c0, c1, x_smem, a_smem0, a_smem1,
                          a_smem2, a_smem3, a_ready, a_empty, BLOCK_M, A_STAGES, X_STAGES, SPLIT, DIAG)),
        (_expand_partition, (q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, pid_n,
                             steps_per_row_block, c0, c1, a_smem0, a_smem1, a_smem2, a_smem3, a_ready, a_empty, 0,
                             K, GROUP_SIZE, ONE, EXPAND, CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S, A_STAGES, PREFETCH,
                             DIAG)),
        (_expand_partition, (q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn, slot, pid_n,
                             steps_per_row_block, c0, c1, a_smem0, a_smem1, a_smem2, a_smem3, a_ready, a_empty, 1,
                             K, GROUP_SIZE, ONE, EXPAND, CONSTRAINTS_E, SEL0, SEL1, CONSTRAINTS_S, A_STAGES, PREFETCH,
                             DIAG)),
    ], [4, 4], [EXPAND_REGS_, EXPAND_REGS_])


@functools.lru_cache(maxsize=64)
def constexprs(k: int, group_size: int, block_m: int, a_stages: int = 2, x_stages: int = 3, prefetch: int = 1,
               expand_regs: int = EXPAND_REGS, split: int = 1, diag: int = 0) -> dict:
    """The kernel's compile-time arguments (also scripts/sbmm_sass.py's)."""
    base = sp2_wgmma.constexprs(k, group_size, block_m, torch.float16, 3, prefetch, True, 1)
    keep = ("K", "GROUP_SIZE", "BLOCK_M", "ONE", "EXPAND", "CONSTRAINTS_E", "SEL0", "SEL1", "CONSTRAINTS_S")
    return dict({name: base[name] for name in keep}, A_STAGES=a_stages, X_STAGES=x_stages, PREFETCH=prefetch,
                EXPAND_REGS_=expand_regs, SPLIT=split, DIAG=diag)


MIN_SPLIT_CHUNKS = 8  # a split-K program's fewest 128-column chunks (below, the pipeline's fill dominates)
# a program's fixed time in chunk-times (launch, pipeline fill, epilogue): o at one 128-row block took 45.9 us in
# 32 chunks and 16.2 us split in four (H200, s25b), so 1.24 us a chunk and 6.3 us fixed
SPLIT_FIXED_CHUNKS = 5.0


def split_k(programs: int, k: int, sms: int) -> int:
    """How many programs share each output tile along K: the split whose waves (one program fits an SM) take the
    least time by `SPLIT_FIXED_CHUNKS` + chunks a program, each program keeping MIN_SPLIT_CHUNKS+ chunks; powers
    of two only (each is a compiled variant). Few tiles split to fill the GPU (32 on 132 SMs: 4); an unlucky count
    splits to even out its last wave (192: 2)."""
    chunks = k // 128
    best, best_t, split = 1, None, 1
    while split == 1 or chunks // split >= MIN_SPLIT_CHUNKS:
        t = -(-programs * split // sms) * (chunks / split + SPLIT_FIXED_CHUNKS)
        if best_t is None or t < 0.97 * best_t:
            best, best_t = split, t
        split *= 2
    return best


def split_choices(n: int, k: int, sms: int, max_blocks: int) -> list[int]:
    """Every `split_k` a launch of up to `max_blocks` 128-row blocks over an [n, k] stack can take (what the
    warm-up compiles)."""
    return sorted({split_k(n // 128 * blocks, k, sms) for blocks in range(1, max_blocks + 1)})


def supported(x: torch.Tensor, n: int, k: int, group_size: int) -> bool:
    """sp2_wgmma's conditions, and N a multiple of 128 (two 64-row blocks of Δ a program)."""
    return sp2_wgmma.supported(x, n, k, group_size) and n % 128 == 0


def sp2_wgmma_ws(x: torch.Tensor, y: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                 starts: Sequence[int], slots: Sequence[int], block_m: int = 128,
                 blocks: torch.Tensor | None = None, a_stages: int = 2, x_stages: int = 3, prefetch: int = 1,
                 expand_regs: int = EXPAND_REGS, max_regs: int = MAX_REGS, split: int | None = None,
                 diag: int = 0) -> int:
    """sp2_wgmma.sp2_wgmma's operation (same arguments) on the warp-specialized kernel; returns how many segments
    it ran. a_stages / x_stages: A and x buffers (x 3+); expand_regs: the expansion partitions' registers;
    max_regs: the kernel's at launch; split: programs a tile along K (None: `split_k`'s choice; above 1 y is
    updated by fp16 atomic adds, so the result's last bit depends on their order); diag: timing variants (1 no
    expansion, 2 no MMAs; wrong results)."""
    n, k, group_size = check_operands(x, y, qweight, meta, scales, slots)
    if not supported(x, n, k, group_size):
        raise ValueError(f"sp2_wgmma_ws runs on Hopper GPUs (sm_90) with fp16 x, N a multiple of 128, K of "
                         f"{SP2_STEP}, scale groups per row or of a multiple of 128; got {x.device}, {x.dtype}, "
                         f"N={n}, K={k}, group {group_size}")
    if x_stages < 3:
        raise ValueError(f"sp2_wgmma_ws needs 3+ x buffers, got {x_stages}")
    if blocks is None:
        blocks = block_table(starts, slots, block_m, x.device)
    if blocks is None:
        return 0
    tiles = n // 128 * (blocks.numel() // 3)
    if split is None:
        split = split_k(tiles, k, sm_count(x.device))
    if not 1 <= split <= k // 128:
        raise ValueError(f"sp2_wgmma_ws splits K={k} into 1 to {k // 128} parts, got {split}")
    grid = (n // 128, blocks.numel() // 3, split)
    args = (x, y, x.stride(0), y.stride(0), qweight, meta, scales, qweight.stride(0), scales.stride(0),
            scales.stride(1), blocks, k // SP2_STEP)
    const = (k, group_size, block_m, a_stages, x_stages, prefetch, expand_regs, split, diag)
    # eager prefill steps launch it per linear: skip Triton's per-call binding
    _LAUNCHES.launch(_sp2_wgmma_ws_kernel, grid, args, const, 4, False, x.device, lambda: constexprs(*const),
                     max_regs)
    return segments_run(starts, slots)


_LAUNCHES = sbmm.LaunchCache()
