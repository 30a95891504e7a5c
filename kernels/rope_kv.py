"""Rotary embedding of q and k and the KV-cache write of a step's new keys and values, in one launch.

What it replaces: the serving attention layer (deltazip/model/layers.py) rotates q and k op by op (casts of the cos
and sin tables, a negation, a concatenation, two products and a sum each) and then writes k and v into their cache
slots with two index copies: ~16 small kernels per layer. In a 16-layer CUDA-graph decode step of 32 sequences
they were about 0.5 ms of its 4.1 ms of kernels on an H200 (read off
bench/results/step-profile-s22-kernel-2bit-d0-L16-s32-*.txt), and each is one more host launch in an eager prefill
step (docs/serving.md, session 22).

On by default on CUDA since session 23 (deltazip/model/layers.py FUSED_ROPE_KV): on an H200 the 16-layer decode step
took 3.73-3.77 ms against 4.30-4.71 ms op by op (bench/worker.py --parts rope-kv-ab); its GPU tests pass.

One program per token: it rotates the token's query heads in place (half-split layout, as Hugging Face Llama), and
writes its rotated key heads and its value heads to the token's cache slot. The math is fp32, rounded once to the
output dtype (the op-by-op form rounds after each op in the activations' dtype: results differ by about an ulp).

`rope_store_kv_reference` is the torch reference (the op-by-op form), for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_halves(ptr, row_off, heads, j, mask, cos1, cos2, sin1, sin2, stride_h, HALF: tl.constexpr):
    """(x1 cos1 - x2 sin1, x2 cos2 + x1 sin2) of the [heads, HALF] halves at ptr + row_off, in fp32."""
    base = ptr + row_off + heads[:, None] * stride_h + j[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)
    j = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + t * stride_ct + j)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + j)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_st + j)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_st + HALF + j)[None, :]
    q_mask = (heads < NUM_HEADS)[:, None]
    r1, r2 = _rotate_halves(q_ptr, t * stride_qt, heads, j, q_mask, cos1, cos2, sin1, sin2, stride_qh, HALF)
    q_out = q_ptr + t * stride_qt + heads[:, None] * stride_qh + j[None, :]
    tl.store(q_out, r1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_out + HALF, r2.to(q_ptr.dtype.element_ty), mask=q_mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    kv_mask = (heads < NUM_KV_HEADS)[:, None]
    r1, r2 = _rotate_halves(k_ptr, t * stride_kt, heads, j, kv_mask, cos1, cos2, sin1, sin2, stride_kh, HALF)
    k_out = kc_ptr + slot * stride_kcs + heads[:, None] * stride_kch + j[None, :]
    tl.store(k_out, r1.to(kc_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(k_out + HALF, r2.to(kc_ptr.dtype.element_ty), mask=kv_mask)
    v_in = v_ptr + t * stride_vt + heads[:, None] * stride_vh + j[None, :]
    v_out = vc_ptr + slot * stride_vcs + heads[:, None] * stride_vch + j[None, :]
    tl.store(v_out, tl.load(v_in, mask=kv_mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(v_out + HALF, tl.load(v_in + HALF, mask=kv_mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=kv_mask)


def rope_store_kv(
    q: torch.Tensor,  # [T, num_heads, head_dim], rotated in place (a view of the q/k/v GEMM's output is fine)
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], read only
    v: torch.Tensor,  # [T, num_kv_heads, head_dim], read only
    cos: torch.Tensor,  # [T, head_dim] fp32 (deltazip.model.layers.Rope)
    sin: torch.Tensor,  # [T, head_dim] fp32
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int, the cache slot (block * block_size + offset) each token writes
) -> torch.Tensor:
    """Rotate q in place, write rotated k and v to their slots; returns q. No host sync: capturable in a CUDA graph.
    Raises ValueError on shapes that do not fit together."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{num_tokens}, kv_heads, {head_dim}]")
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"head_dim must be twice a power of two, got {head_dim}")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [{num_tokens}, {head_dim}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must have one slot per token ({num_tokens})")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} must end in "
                         f"[{num_kv_heads}, {head_dim}]")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if num_tokens == 0:
        return q
    kc = k_cache.view(-1, num_kv_heads, head_dim)  # [slots, kv_heads, head_dim]
    vc = v_cache.view(-1, num_kv_heads, head_dim)
    _rope_store_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, kc, vc, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_P2=triton.next_power_of_2(max(num_heads, num_kv_heads)), HALF=head_dim // 2,
        num_warps=4,
    )
    return q


def rope_store_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """The op-by-op form: returns the rotated q (a new tensor), writes k_cache / v_cache."""

    def rotate(x):
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s

    heads, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping.long(), rotate(k).to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))
    return rotate(q)
