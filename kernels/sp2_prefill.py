"""Prefill-sized segments on sp2 slot words: each delta tile expanded once per block of 64-128 rows, then a dense dot.

The SBMM kernels (kernels/sbmm_spmma2.py) expand every delta word again for each 16-row block: a 128-row segment
costs the 2-bit kernel ~2.5x the base GEMM of its shape on an H200 (docs/serving.md, session 23), compute bound
where its bytes would take ~4 % of that time. This kernel reads the same sp2 words (kernels/spmma_layout.py
`pack_sp2`, what CUDA slots hold for 2-bit deltas) and, per program, expands a [BLOCK_N, 32 * BLOCK_W] tile of Δ
into registers (codes and 2:4 positions decoded from the sp2 order, each kept value placed by a compare per
column) for every K step, then multiplies it with BLOCK_M rows of x on the dense tensor cores (`tl.dot`, fp32
accumulation). One expansion feeds BLOCK_M rows, so the expansion's cost falls with the block: 8x fewer
expansions than SBMM at 128-row blocks.

Rows come as blocks of one segment each (`row_blocks`): (first row, end row, slot); a program computes one
block's rows for BLOCK_N output columns and adds them into y (y rounded once, as kernels/reference.py).

Measured on an H200 (session 23, bench/sp2_prefill.py, docs/kernels.md run 26): correct (GPU tests), but 3.5-7x
slower than SBMM at 64-512 rows. The time follows the number of tile expansions, so the expansion itself (the
per-column compares and the reshape into the dot's layout) is the cost, not the dot. So no route sends segments
here (kernels/delta_linear.py sends long sp2 segments to kernels/sp2_wgmma.py on Hopper); its block tables and
operand checks serve that kernel.

sp2 addresses of a canonical position (kernels/spmma_layout.py `_sp2_words_kernel` / `_sp2_meta_kernel`): row
n = 64b + 16rb + 8h + g, canonical word w = 8s + 2u + e (32 dense columns, groups 8w .. 8w + 7), group
grp = 4hi + t of the word, kept slot i:
- code: sp2 word (b * K/256 + s) * 512 + 128rb + 16g + 4t + u, bits 2(8i + 4e + 2hi + h);
- 2:4 position: sp2 meta word (b * K/256 + s) * 512 + 128rb + 16g + 4(2e + hi) + u, bits 16h + 2(2t + i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.spmma_layout import SP2_STEP, TILE_ROWS

DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_W": 2, "num_warps": 8, "num_stages": 2}


@triton.jit
def _sp2_prefill_kernel(
    x_ptr, y_ptr, stride_x, stride_y,
    q_ptr, m_ptr, s_ptr, stride_qslot, stride_sslot, stride_sn,
    blocks_ptr, steps_per_row_block,
    K: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    r0 = tl.load(blocks_ptr + 3 * pid_b)
    r1 = tl.load(blocks_ptr + 3 * pid_b + 1)
    slot = tl.load(blocks_ptr + 3 * pid_b + 2).to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < r1
    BK: tl.constexpr = 32 * BLOCK_W

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = n[:, None, None]  # [BN, 1, 1]
    rem = n3 % 64
    h = (rem // 8) % 2
    row_part = (n3 // 64) * steps_per_row_block * 512 + (rem // 16) * 128 + (rem % 8) * 16  # [BN, 1, 1]
    grp = tl.arange(0, 8)[None, None, :]  # [1, 1, 8]: the group within a canonical word
    t = grp % 4
    hi = grp // 4
    j = tl.arange(0, 4)[None, None, None, :]  # [1, 1, 1, 4]: the column within a group
    q_base = q_ptr + slot * stride_qslot
    m_base = m_ptr + slot * stride_qslot  # meta has qweight's shape (int32 [slots, N, K / 32])
    s_rows = s_ptr + slot * stride_sslot + n * stride_sn  # [BN]
    cols = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw in range(0, K // 32, BLOCK_W):
        w = kw + tl.arange(0, BLOCK_W)[None, :, None]  # [1, BW, 1]: canonical word index
        s = w // 8
        u = (w % 8) // 2
        e = w % 2
        step = row_part + s * 512 + u  # [BN, BW, 1]
        qword = tl.load(q_base + step + 4 * t)  # [BN, BW, 8]
        shift = 2 * (4 * e + 2 * hi + h)
        c0 = (qword >> shift) & 3
        c1 = (qword >> (shift + 16)) & 3
        mword = tl.load(m_base + step + 4 * (2 * e + hi))
        mshift = 16 * h + 4 * t
        i0 = (mword >> mshift) & 3
        i1 = (mword >> (mshift + 2)) & 3
        scale = tl.load(s_rows + (kw * 32) // GROUP_SIZE).to(tl.float32)[:, None, None, None]  # [BN, 1, 1, 1]
        v0 = (c0 - 2).to(tl.float32)[:, :, :, None] * scale  # symmetric 2-bit: z = 2
        v1 = (c1 - 2).to(tl.float32)[:, :, :, None] * scale
        d = tl.where(i0[:, :, :, None] == j, v0, 0.0) + tl.where(i1[:, :, :, None] == j, v1, 0.0)  # [BN, BW, 8, 4]
        d = tl.reshape(d, [BLOCK_N, BK]).to(x_ptr.dtype.element_ty)  # Δ rounded to the activation dtype
        xt = tl.load(x_rows + (kw * 32 + cols)[None, :], mask=row_ok[:, None], other=0.0)  # [BM, BK]
        if DOT_FP32:  # the interpreter's bf16 dot is wrong (and fp16 is slow there): same values in fp32
            acc += tl.dot(xt.to(tl.float32), tl.trans(d.to(tl.float32)))
        else:
            acc += tl.dot(xt, tl.trans(d))

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_y + n[None, :]
    yv = tl.load(y_ptrs, mask=row_ok[:, None], other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=row_ok[:, None])


def row_blocks(starts: Sequence[int], slots: Sequence[int], block_m: int, min_rows: int = 1) -> list[int]:
    """Flat (first row, end row, slot) triples: every segment with a slot >= 0 and at least `min_rows` rows, cut
    into blocks of `block_m` rows."""
    out: list[int] = []
    for i, slot in enumerate(slots):
        a, b = starts[i], starts[i + 1]
        if slot < 0 or b - a < min_rows:
            continue
        for r in range(a, b, block_m):
            out += (r, min(r + block_m, b), slot)
    return out


def block_table(starts: Sequence[int], slots: Sequence[int], block_m: int, device: torch.device | str,
                min_rows: int = 1) -> torch.Tensor | None:
    """`row_blocks` as the int32 tensor the kernels read, on `device` (None: no block). On CUDA it is copied from
    pinned memory, so the copy does not wait for the GPU to catch up with the host. A caller that captures the
    launch in a CUDA graph makes it before the capture and passes it (`blocks=`): a copy recorded in the graph
    would read host memory that is gone by the time the graph replays."""
    table = row_blocks(starts, slots, block_m, min_rows)
    return device_ints(table, torch.int32, device) if table else None


def device_ints(values: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list as an integer tensor on `device`; on CUDA copied from pinned memory, so the copy does not wait
    for the GPU to catch up with the host (a pageable copy would)."""
    t = torch.tensor(list(values), dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def segments_run(starts: Sequence[int], slots: Sequence[int], min_rows: int = 1) -> int:
    """How many segments a launch over these runs: a slot >= 0 and at least `min_rows` (>= 1) rows."""
    return sum(1 for i, s in enumerate(slots) if s >= 0 and starts[i + 1] - starts[i] >= max(min_rows, 1))


def check_operands(x: torch.Tensor, y: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor,
                   scales: torch.Tensor, slots: Sequence[int]) -> tuple[int, int, int]:
    """Raise ValueError unless x, y and the sp2 stack fit each other and every slot is in range; (N, K, group
    size). The checks both prefill kernels' wrappers share."""
    num_slots, n, words = qweight.shape
    t, k = x.shape
    if words * 32 != k or meta.shape != qweight.shape or scales.shape[:2] != (num_slots, n):
        raise ValueError(f"sp2 words {tuple(qweight.shape)}, meta {tuple(meta.shape)}, scales {tuple(scales.shape)} "
                         f"do not fit K={k}")
    if y.shape != (t, n) or x.stride(1) != 1 or y.stride(1) != 1 or y.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)}: [T, K] -> [T, N], same dtype, unit stride")
    if any(s >= num_slots for s in slots):
        raise ValueError(f"slot out of range [0, {num_slots}): {list(slots)}")
    return n, k, k // scales.shape[-1]


def supported(x: torch.Tensor, n: int, k: int, bits: int, group_size: int, sym: bool, sp2: bool) -> bool:
    """Whether this kernel takes a launch: sp2 words (2-bit symmetric), N a multiple of 64, K of 256, scale
    groups per row or a multiple of 64 columns, fp16/bf16 x (fp32 too off CUDA, for the interpreter)."""
    dtypes = (torch.float16, torch.bfloat16) if x.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    return (sp2 and bits == 2 and sym and n % TILE_ROWS == 0 and k % SP2_STEP == 0 and x.dtype in dtypes
            and (group_size == k or group_size % 64 == 0))


def sp2_prefill(x: torch.Tensor, y: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                starts: Sequence[int], slots: Sequence[int], min_rows: int = 1, config: dict | None = None,
                blocks: torch.Tensor | None = None) -> int:
    """In place y[seg] += x[seg] @ dequant(Δ[slot(seg)]).T for every segment with a slot >= 0 and at least
    `min_rows` rows; returns how many segments it ran. x: [T, K] fp16/bf16, y: [T, N] (unit stride in the last
    dim); qweight / meta: sp2 words int32 [num_slots, N, K / 32]; scales fp16 [num_slots, N, G]; starts / slots:
    the segments as host lists (rows starts[i]:starts[i + 1] on slot slots[i], -1 = no delta); blocks: their
    `block_table` for this config's BLOCK_M, made ahead (CUDA-graph captures), else made here."""
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    n, k, group_size = check_operands(x, y, qweight, meta, scales, slots)
    if not supported(x, n, k, 2, group_size, True, True):
        raise ValueError(f"sp2_prefill: N={n} (multiple of 64), K={k} (of 256), group {group_size}, {x.dtype}")
    block_n = cfg["BLOCK_N"] if n % cfg["BLOCK_N"] == 0 else TILE_ROWS
    bk = 32 * cfg["BLOCK_W"]
    if group_size != k and group_size % bk:
        raise ValueError(f"scale groups of {group_size} columns: BLOCK_W {cfg['BLOCK_W']} spans {bk}")
    if blocks is None:
        blocks = block_table(starts, slots, cfg["BLOCK_M"], x.device, min_rows)
    if blocks is None:
        return 0
    grid = (n // block_n, blocks.numel() // 3)
    _sp2_prefill_kernel[grid](
        x, y, x.stride(0), y.stride(0), qweight, meta, scales, qweight.stride(0), scales.stride(0), scales.stride(1),
        blocks, k // SP2_STEP,
        K=k, GROUP_SIZE=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_W=cfg["BLOCK_W"],
        DOT_FP32=not x.is_cuda, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return segments_run(starts, slots, min_rows)
