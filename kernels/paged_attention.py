"""Decode attention straight from the paged KV cache: one new token per sequence, read over its whole context.

What it replaces: deltazip/model/attention.py's paged path gathers every sequence's K/V pages into a padded
[S, bucket, heads, head_dim] copy per layer and runs SDPA with a mask over it. For a decode step that copy costs as
much as the attention itself, and both read the padded bucket, not the context (docs/serving.md, session 22: the
gather and the attention were 2.3 of a 16-layer step's 5.5 ms of kernels on an H200, 32 sequences).

This kernel reads each sequence's own K/V rows once, through its block table, with an online softmax in fp32:
one program per sequence, group of HEADS_PER_PROGRAM query heads (the K/V head of query head h is h // group, so
grouped-query heads re-read the same rows, mostly from L1/L2) and context split. The loop runs to the sequence's
context length, read on the device: a CUDA graph captured once serves any context, and rows past their length
cost nothing. A small batch splits each context over several programs (`split_count`) so every SM has work; a
second kernel combines the splits' partial results by their softmax maxima and sums.

`paged_decode_reference` is the torch reference (the same math, a gather per sequence), for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sbmm_plan import interpreting, sm_count

# Launch config (measured on an H200: bench/attention.py): tokens per loop iteration, query heads per program,
# warps per program; and the context split for small batches (split_count).
BLOCK_N = 64
HEADS_PER_PROGRAM = 1
NUM_WARPS = 4
MAX_SPLITS = 16
TARGET_PROGRAMS_PER_SM = 4


@triton.jit
def _attend(q, m, l, acc, start, end, table, k_ptr, v_ptr, kv_heads, d,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Context positions start..start+BLOCK (those < end) folded into the running max m [HB], sum l [HB] and
    weighted values acc [HB, D] of the program's HB query heads (q [HB, D], their K/V heads kv_heads [HB])."""
    pos = start + tl.arange(0, BLOCK)
    valid = pos < end
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    row = (block * stride_kb + offset * stride_ks)[:, None, None]
    k = tl.load(k_ptr + row + (kv_heads * stride_kh)[None, :, None] + d[None, None, :],
                mask=valid[:, None, None], other=0.0).to(tl.float32)  # [BLOCK, HB, D]
    row = (block * stride_vb + offset * stride_vs)[:, None, None]
    v = tl.load(v_ptr + row + (kv_heads * stride_vh)[None, :, None] + d[None, None, :],
                mask=valid[:, None, None], other=0.0).to(tl.float32)
    qk = tl.where(valid[:, None], tl.sum(k * q[None, :, :], 2), float("-inf"))  # [BLOCK, HB]
    m_new = tl.maximum(m, tl.max(qk, 0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(qk - m_new[None, :])
    return m_new, l * alpha + tl.sum(p, 0), acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 0)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_ptr, ml_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb, stride_ot, stride_oh,
    scale, num_heads,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    HB: tl.constexpr, SPLITS: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * HB + tl.arange(0, HB)
    split = tl.program_id(2)
    kv_heads = heads // GROUP
    ctx = tl.load(lens_ptr + seq).to(tl.int32)
    # this split's share of the context, whole BLOCKs (SPLITS == 1: all of it)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK) * BLOCK
    begin = split * chunk
    end = tl.minimum(begin + chunk, ctx)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :]).to(tl.float32) * scale
    m = tl.full([HB], float("-inf"), tl.float32)
    l = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, HEAD_DIM], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    if MAX_ITERS == 0:  # compiled: the loop runs to this sequence's context length, read on the device
        for start in range(begin, end, BLOCK):
            m, l, acc = _attend(q, m, l, acc, start, end, table, k_ptr, v_ptr, kv_heads, d, stride_kb, stride_ks,
                                stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK)
    else:  # the CPU interpreter cannot take a loop bound loaded from memory: a fixed count, past `end` skipped
        for it in range(0, MAX_ITERS):
            if begin + it * BLOCK < end:
                m, l, acc = _attend(q, m, l, acc, begin + it * BLOCK, end, table, k_ptr, v_ptr, kv_heads, d,
                                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE,
                                    BLOCK)
    if SPLITS == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty))
    else:  # partial result of this split, normalised (0 where the split had no context), with its max and sum
        at = (seq * num_heads + heads) * SPLITS + split  # [HB]
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # acc is 0 where l is
        tl.store(part_ptr + at[:, None] * HEAD_DIM + d[None, :], out)
        tl.store(ml_ptr + 2 * at, m)
        tl.store(ml_ptr + 2 * at + 1, l)


@triton.jit
def _combine_splits_kernel(part_ptr, ml_ptr, out_ptr, stride_ot, stride_oh, num_heads,
                           HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """out[seq, head] from its SPLITS partial results: each weighted by its sum times exp(its max - the max)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    at = (seq * num_heads + head) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(ml_ptr + 2 * at)
    l = tl.load(ml_ptr + 2 * at + 1)
    w = tl.where(l > 0, l * tl.exp(m - tl.max(m, 0)), 0.0)  # [SPLITS]
    d = tl.arange(0, HEAD_DIM)
    part = tl.load(part_ptr + at[:, None] * HEAD_DIM + d[None, :])  # [SPLITS, D]
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_count(num_seqs: int, num_programs: int, max_context_len: int, device: torch.device) -> int:
    """Context splits per (sequence, head group): enough programs for TARGET_PROGRAMS_PER_SM on every SM, a power
    of two up to MAX_SPLITS, none that would get less than one BLOCK_N of the longest context."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    splits = 1
    while (splits < MAX_SPLITS and num_programs * splits < TARGET_PROGRAMS_PER_SM * sms
           and max_context_len > 2 * splits * BLOCK_N):
        splits *= 2
    return splits


def _check_shapes(q, k_cache, v_cache, block_tables, context_lens, num_seqs: int) -> None:
    """ValueError unless q [T, heads, head_dim], the caches and the per-sequence tensors fit together."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, kv_dim = k_cache.shape[2], k_cache.shape[3]
    if v_cache.shape != k_cache.shape or kv_dim != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match, with "
                         f"head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         f"must have one row per sequence ({num_seqs})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")


def paged_decode_attention(
    q: torch.Tensor,  # [S, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [S, max_blocks] int32/int64; entries past a sequence's context are not read
    context_lens: torch.Tensor,  # [S] int32/int64, >= 1: tokens in the cache, the new one included
    scale: float,
    out: torch.Tensor | None = None,
    max_context_len: int = 0,
    splits: int | None = None,
) -> torch.Tensor:  # [S, num_heads, head_dim], q's dtype
    """Attention of each sequence's one new token over its cached context (its own key included). No host sync:
    capturable in a CUDA graph. max_context_len: a host-known bound on the contexts (0: the block tables' width),
    which only sets how many splits a small batch gets; splits: that count given (None: `split_count`).
    Raises ValueError on shapes that do not fit together."""
    num_seqs, num_heads, head_dim = q.shape
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens, num_seqs)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    heads_per_program = HEADS_PER_PROGRAM if num_heads % HEADS_PER_PROGRAM == 0 else 1
    num_programs = num_seqs * (num_heads // heads_per_program)
    if splits is None:
        splits = split_count(num_seqs, num_programs, max_context_len or block_tables.shape[1] * block_size, q.device)
    elif splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits must be a power of two >= 1, got {splits}")
    part = ml = out  # unused with one split
    if splits > 1:
        part = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_seqs, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    max_iters = 0  # the interpreter's fixed loop count: BLOCK_N steps over a split's share of the widest table
    if interpreting():
        max_iters = _cdiv(_cdiv(block_tables.shape[1] * block_size, splits), BLOCK_N)
    _paged_decode_kernel[(num_seqs, num_heads // heads_per_program, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, ml,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale), num_heads,
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK=BLOCK_N,
        HB=heads_per_program, SPLITS=splits, MAX_ITERS=max_iters, num_warps=NUM_WARPS,
    )
    if splits > 1:
        _combine_splits_kernel[(num_seqs, num_heads)](part, ml, out, out.stride(0), out.stride(1), num_heads,
                                                      HEAD_DIM=head_dim, SPLITS=splits)
    return out


# Varlen (prefill and mixed) steps: query rows per program, key tokens per loop iteration, warps.
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 4


@triton.jit
def _varlen_block(q, m, l, acc, start, q_pos, kv_end, table, k_ptr, v_ptr, kv_head, d,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """Keys start..start+BLOCK_N (those < kv_end and <= each row's position) folded into the rows' running max m
    [M], sum l [M] and weighted values acc [M, D]; q [M, D] is pre-scaled."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < kv_end
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + (block * stride_kb + offset * stride_ks)[:, None] + kv_head * stride_kh + d[None, :],
                mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + (block * stride_vb + offset * stride_vs)[:, None] + kv_head * stride_vh + d[None, :],
                mask=valid[:, None], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    if DOT_FP32:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [M, N] fp32
    else:
        qk = tl.dot(q, tl.trans(k))
    keep = valid[None, :] & (pos[None, :] <= q_pos[:, None])
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(qk - m_new[:, None])
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _paged_varlen_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, qsl_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb, stride_ot, stride_oh,
    scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    seq = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_first = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_first
    if m0 < q_len:  # programs past this sequence's new tokens have nothing to do
        ctx = tl.load(lens_ptr + seq).to(tl.int32)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        # new token i sits at position ctx - q_len + i and sees keys up to it; rows past q_len act as the last
        # token (so every row has a key), and are not stored
        q_pos = ctx - q_len + tl.minimum(rows, q_len - 1)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_first + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        kv_end = tl.minimum(ctx, ctx - q_len + m0 + BLOCK_M)  # keys past the block's last row are masked anyway
        if MAX_ITERS == 0:
            for start in range(0, kv_end, BLOCK_N):
                m, l, acc = _varlen_block(q, m, l, acc, start, q_pos, kv_end, table, k_ptr, v_ptr, kv_head, d,
                                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                          BLOCK_SIZE, BLOCK_N, DOT_FP32)
        else:  # the CPU interpreter: a fixed loop count (see _paged_decode_kernel)
            for it in range(0, MAX_ITERS):
                if it * BLOCK_N < kv_end:
                    m, l, acc = _varlen_block(q, m, l, acc, it * BLOCK_N, q_pos, kv_end, table, k_ptr, v_ptr,
                                              kv_head, d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                              stride_vh, BLOCK_SIZE, BLOCK_N, DOT_FP32)
        out = acc / l[:, None]
        tl.store(out_ptr + (q_first + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_varlen_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], each sequence's new tokens back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's keys already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    context_lens: torch.Tensor,  # [S] tokens in the cache after this step, new ones included
    query_start_loc: torch.Tensor,  # [S + 1] prefix sums of new tokens per sequence
    scale: float,
    max_query_len: int,  # host-known longest run of new tokens (sets the grid)
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of each sequence's new tokens (a prefill chunk, a whole prompt or one decode token) over its
    cached context, read straight from the pages: no padded copy, and no work for the padding of short runs beyond
    one empty program each. Raises ValueError on shapes that do not fit together."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    _check_shapes(q, k_cache, v_cache, block_tables, context_lens, num_seqs)
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc {tuple(query_start_loc.shape)} must have {num_seqs + 1} entries")
    if max_query_len < 1 and num_tokens:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    block_m = min(PREFILL_BLOCK_M, max(16, triton.next_power_of_2(max_query_len)))
    max_iters = 0
    if interpreting():  # keys a block of rows can see: at most the widest table
        max_iters = _cdiv(block_tables.shape[1] * block_size, PREFILL_BLOCK_N)
    _paged_varlen_kernel[(num_seqs, _cdiv(max_query_len, block_m), num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=PREFILL_BLOCK_N, DOT_FP32=interpreting() or q.dtype == torch.float32, MAX_ITERS=max_iters,
        num_warps=PREFILL_NUM_WARPS,
    )
    return out


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """paged_decode_attention in plain torch: the varlen reference with one new token per sequence."""
    query_start_loc = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_varlen_reference(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale)


def paged_varlen_reference(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale) -> torch.Tensor:
    """paged_varlen_attention in plain torch, one sequence at a time (fp32 math)."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for s in range(context_lens.shape[0]):
        first, last, n = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(context_lens[s])
        if last == first:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[s].to(torch.long)[pos // block_size]
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [n, heads, dim]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(n - (last - first), n, device=q.device)  # positions of the new tokens
        scores = torch.einsum("thd,nhd->htn", q[first:last].float() * scale, k)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[first:last] = torch.einsum("htn,nhd->thd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    return out
