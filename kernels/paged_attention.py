"""Decode attention straight from the paged KV cache: one new token per sequence, read over its whole context.

What it replaces: deltazip/model/attention.py's paged path gathers every sequence's K/V pages into a padded
[S, bucket, heads, head_dim] copy per layer and runs SDPA with a mask over it. For a decode step that copy costs as
much as the attention itself, and both read the padded bucket, not the context (docs/serving.md, session 22: the
gather and the attention were 2.3 of a 16-layer step's 5.5 ms of kernels on an H200, 32 sequences).

This kernel reads each sequence's own K/V rows once, through its block table, with an online softmax in fp32
(one program per sequence and query head; the K/V head is head // group, so grouped-query attention is served
by several programs reading the same rows, mostly from L2). The loop runs to the sequence's context length,
read on the device: a CUDA graph captured once serves any context, and rows past their length cost nothing.

`paged_decode_reference` is the torch reference (the same math, a gather per sequence), for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sbmm_plan import interpreting

# Tokens per loop iteration and warps per program (measured on an H200: bench/attention.py).
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _attend(q, m, l, acc, start, ctx, table, k_ptr, v_ptr, kv_head, d,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of context positions from `start` folded into the running (max, sum, weighted values)."""
    pos = start + tl.arange(0, BLOCK)
    valid = pos < ctx
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offset = (pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
                + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    qk = tl.where(valid, tl.sum(q[None, :] * k, 1), float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(qk - m_new)
    v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return m_new, l * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * v, 0)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb, stride_ot, stride_oh,
    scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    ctx = tl.load(lens_ptr + seq).to(tl.int32)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + head * stride_qh + d).to(tl.float32) * scale
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    l = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    if MAX_ITERS == 0:  # compiled: the loop runs to this sequence's context length, read on the device
        for start in range(0, ctx, BLOCK):
            m, l, acc = _attend(q, m, l, acc, start, ctx, table, k_ptr, v_ptr, kv_head, d, stride_kb, stride_ks,
                                stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK)
    else:  # the CPU interpreter cannot take a loop bound loaded from memory: a fixed count, past ctx skipped
        for it in range(0, MAX_ITERS):
            if it * BLOCK < ctx:
                m, l, acc = _attend(q, m, l, acc, it * BLOCK, ctx, table, k_ptr, v_ptr, kv_head, d, stride_kb,
                                    stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK)
    out = acc / l
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # [S, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [S, max_blocks] int32/int64; entries past a sequence's context are not read
    context_lens: torch.Tensor,  # [S] int32/int64, >= 1: tokens in the cache, the new one included
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [S, num_heads, head_dim], q's dtype
    """Attention of each sequence's one new token over its cached context (its own key included). No host sync:
    capturable in a CUDA graph. Raises ValueError on shapes that do not fit together."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
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
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    _paged_decode_kernel[(num_seqs, num_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale),
        GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK=BLOCK_N,
        MAX_ITERS=-(-block_tables.shape[1] * block_size // BLOCK_N) if interpreting() else 0, num_warps=NUM_WARPS,
    )
    return out


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """The same attention in plain torch, one sequence at a time (fp32 math)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for s in range(num_seqs):
        n = int(context_lens[s])
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[s].to(torch.long)[pos // block_size]
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [n, heads, dim]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[s].float() * scale, k), dim=-1)
        out[s] = torch.einsum("hn,nhd->hd", w, v).to(q.dtype)
    return out
