"""Attention math: paged (serving, varlen) and causal dense (training, calibration).

Decode-only steps on CUDA (one new token per sequence) read the paged KV cache directly with a Triton kernel
(kernels/paged_attention.py). Sequences with prefill chunks gather their K/V pages into a padded batch and run one
SDPA call with an explicit mask; in a mixed step on CUDA only they do, and its decode rows take the kernel.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from deltazip.model.context import AttentionMetadata
from kernels import paged_attention as paged_kernel

# SDPA backends the paged path may use on CUDA; None = PyTorch's own choice. Serving shapes (sequences, query and
# context lengths) change at nearly every prefill step, and cuDNN attention plans per shape: it is left out.
# bench/worker.py --parts prefill times a prefill step of fresh shapes with this list and with None.
PAGED_BACKENDS: list[SDPBackend] | None = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                           SDPBackend.MATH]


# Decode-only steps on CUDA use kernels/paged_attention.py; False: the gather + SDPA path for every step
# (bench/worker.py --parts decode-attn-ab times both).
DECODE_KERNEL = True


def decode_kernel_applies(device: torch.device) -> bool:
    """Whether decode-only steps on `device` read the cache directly (no padded gather: the context length
    a step's graph was captured for does not matter)."""
    return DECODE_KERNEL and device.type == "cuda"


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Write this step's keys and values into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# paged_attention keeps its per-step index tensors on the metadata (AttentionMetadata.step_cache) so later layers
# reuse the first layer's; False recomputes them in every layer (bench/worker.py --parts attn-cache-ab times both).
CACHE_STEP_INDICES = True


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole cached context."""
    num_tokens = q.shape[0]
    if decode_kernel_applies(q.device):
        if meta.max_query_len == 1 and num_tokens == meta.num_seqs:
            return paged_kernel.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                       scale, max_context_len=meta.max_context_len)
        if SPLIT_MIXED_STEPS and meta.host_lens is not None:
            split = _mixed_split(meta, q.device)
            if split is not None:
                return _split_attention(q, k_cache, v_cache, split, scale)
    return _gather_attention(q, k_cache, v_cache, meta, scale)


# A mixed step (prefill chunks and decode rows) on CUDA sends its decode rows through the decode kernel and pads
# only its prefill sequences for SDPA; False: every row padded to the longest chunk, as before (bench/worker.py
# --parts mixed-attn-ab times both).
SPLIT_MIXED_STEPS = True


@dataclass(slots=True)
class _MixedSplit:
    """A mixed step's decode sequences and prefill sequences, each with its token rows and its own metadata."""

    decode_rows: torch.Tensor  # [Sd] token rows of the decode sequences
    decode_tables: torch.Tensor  # [Sd, max_blocks]
    decode_lens: torch.Tensor  # [Sd]
    decode_max_ctx: int
    prefill_rows: torch.Tensor  # [Tp] token rows of the prefill sequences, in order
    prefill_meta: AttentionMetadata  # their metadata, rows renumbered 0..Tp-1


def _mixed_split(meta: AttentionMetadata, device: torch.device) -> _MixedSplit | None:
    """The step's split (made by the first layer, kept in step_cache), or None when every sequence is of one kind."""
    key = ("mixed-split", device)
    if key in meta.step_cache:
        return meta.step_cache[key]
    lens = meta.host_lens
    decode = [i for i, (n, _) in enumerate(lens) if n == 1]
    split = None
    if decode and len(decode) < len(lens):
        prefill = [i for i, (n, _) in enumerate(lens) if n != 1]
        starts = [0]
        for n, _ in lens:
            starts.append(starts[-1] + n)
        prefill_rows = [r for i in prefill for r in range(starts[i], starts[i + 1])]
        prefill_qsl = [0]
        for i in prefill:
            prefill_qsl.append(prefill_qsl[-1] + lens[i][0])

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device)

        decode_index, prefill_index = as_tensor(decode), as_tensor(prefill)
        rows = as_tensor(prefill_rows)
        split = _MixedSplit(
            decode_rows=as_tensor([starts[i] for i in decode]),
            decode_tables=meta.block_tables[decode_index],
            decode_lens=meta.context_lens[decode_index],
            decode_max_ctx=max(lens[i][1] for i in decode),
            prefill_rows=rows,
            prefill_meta=AttentionMetadata(
                positions=meta.positions[rows], slot_mapping=meta.slot_mapping[rows],
                block_tables=meta.block_tables[prefill_index], context_lens=meta.context_lens[prefill_index],
                query_start_loc=as_tensor(prefill_qsl), max_query_len=max(lens[i][0] for i in prefill),
                max_context_len=max(lens[i][1] for i in prefill)))
    meta.step_cache[key] = split
    return split


def _split_attention(q, k_cache, v_cache, split: _MixedSplit, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    out[split.decode_rows] = paged_kernel.paged_decode_attention(
        q[split.decode_rows], k_cache, v_cache, split.decode_tables, split.decode_lens, scale,
        max_context_len=split.decode_max_ctx)
    out[split.prefill_rows] = _gather_attention(q[split.prefill_rows], k_cache, v_cache, split.prefill_meta, scale)
    return out


def _gather_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Every sequence's pages gathered into a padded batch, then one SDPA call with a causal mask."""
    num_tokens = q.shape[0]
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    key = ("paged", num_tokens, block_size, q.device)
    idx = meta.step_cache.get(key) if CACHE_STEP_INDICES else None
    if idx is None:
        idx = _step_indices(meta, num_tokens, block_size, q.device)
        if CACHE_STEP_INDICES:
            meta.step_cache[key] = idx
    q_index, slots, mask, rows = idx
    q_pad = q[q_index]  # [S, max_q, num_heads, head_dim]
    k_pad = k_cache.view(-1, num_kv_heads, head_dim)[slots]  # [S, max_ctx, num_kv_heads, head_dim]
    v_pad = v_cache.view(-1, num_kv_heads, head_dim)[slots]
    backends = sdpa_kernel(PAGED_BACKENDS) if q.is_cuda and PAGED_BACKENDS else contextlib.nullcontext()
    with backends:
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            k_pad.to(q.dtype).transpose(1, 2),
            v_pad.to(q.dtype).transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_kv_heads != q.shape[1],
        )  # [S, num_heads, max_q, head_dim]
    if rows is None:
        return out[:, :, 0]  # decode only (CUDA-graph capturable)
    return out.transpose(1, 2).reshape(-1, q.shape[1], head_dim)[rows]


def _step_indices(meta: AttentionMetadata, num_tokens: int, block_size: int, device: torch.device) -> tuple:
    """(q_index [S, max_q], cache slots [S, max_ctx], mask [S, 1, max_q, max_ctx], output rows [T] or None for a
    decode-only step): what paged_attention gathers by, the same in every layer of a forward."""
    max_q, max_ctx = meta.resolved_max_lens()
    qsl = meta.query_start_loc.to(device=device, dtype=torch.long)
    q_lens = qsl[1:] - qsl[:-1]  # [S]
    ctx_lens = meta.context_lens.to(device=device, dtype=torch.long)  # [S]

    # Queries padded per sequence.
    j = torch.arange(max_q, device=device)
    q_index = (qsl[:-1, None] + j[None, :]).clamp(max=max(num_tokens - 1, 0))

    # Keys/values gathered page by page.
    pos = torch.arange(max_ctx, device=device)
    blocks = meta.block_tables.to(device=device, dtype=torch.long)[:, pos // block_size].clamp(min=0)
    slots = blocks * block_size + pos % block_size  # [S, max_ctx]

    # New token j of a sequence sits at absolute position ctx_len - q_len + j and sees keys up to it.
    q_pos = (ctx_lens - q_lens)[:, None] + j[None, :]  # [S, max_q]
    mask = pos[None, None, :] <= q_pos[:, :, None]  # [S, max_q, max_ctx]; padded keys lie beyond q_pos
    if max_q == 1 and num_tokens == q_lens.shape[0]:
        return q_index, slots, mask[:, None], None
    # Token t of sequence s sits at row s * max_q + (t - qsl[s]) of the padded output. Gathered by index, with
    # the token count known on the host: a boolean mask here would sync with the device in every layer.
    token_seq = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=device), q_lens, output_size=num_tokens)
    rows = token_seq * max_q + torch.arange(num_tokens, device=device) - qsl[token_seq]  # [T]
    return q_index, slots, mask[:, None], rows


def causal_attention(
    q: torch.Tensor,  # [B, L, num_heads, head_dim]
    k: torch.Tensor,  # [B, L, num_kv_heads, head_dim]
    v: torch.Tensor,  # [B, L, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [B, L, num_heads, head_dim]
    """Plain causal self-attention over full sequences, no cache."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)
