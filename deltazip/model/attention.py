"""Attention math: paged (serving, varlen) and causal dense (training, calibration).

Decode-only steps on CUDA (one new token per sequence) read the paged KV cache directly with a Triton kernel
(kernels/paged_attention.py). Other paged steps (prefill chunks mixed with decode rows) gather each sequence's K/V
pages into a padded batch and run one SDPA call with an explicit mask, unless PREFILL_KERNEL sends them to the same
file's varlen kernel (on by default on CUDA since session 23: 16-layer prefill steps 1.5x faster on an H200).
"""

from __future__ import annotations

import contextlib

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


# Steps with prefill chunks on CUDA use kernels/paged_attention.py's varlen kernel (no padded gather). On an H200
# (session 23) 16-layer prefill steps took 8.40-8.46 ms against 12.08-12.94 ms gathered (bench/worker.py --parts
# prefill-attn-ab), per layer 2.1-34x (bench/attention.py --mixed). False: the gather + SDPA path.
PREFILL_KERNEL = True


def prefill_kernel_applies(device: torch.device) -> bool:
    """Whether steps with prefill chunks on `device` read the cache directly (varlen kernel)."""
    return PREFILL_KERNEL and device.type == "cuda"


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
    if meta.max_query_len == 1 and num_tokens == meta.num_seqs and decode_kernel_applies(q.device):
        return paged_kernel.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                                   max_context_len=meta.max_context_len)
    if prefill_kernel_applies(q.device):
        return paged_kernel.paged_varlen_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                   meta.query_start_loc, scale, meta.resolved_max_lens()[0])
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
