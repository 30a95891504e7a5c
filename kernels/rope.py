"""Rotary position embedding in one launch: out[t, h] = rotate(x[t, h]) by the cos/sin tables of token t.

The op-by-op form (deltazip/model/layers.py `apply_rotary`) is seven small kernels per tensor (two casts of the
tables, a negation, a concatenation, two products and a sum): fourteen per layer for q and k, where each is a few
microseconds of a decode step. This kernel reads x (any row and head strides, unit stride in the last dim) and the
fp32 tables once, computes in fp32 and writes a contiguous result. Half-split layout, as Hugging Face Llama: the
tables repeat their first half (`RotaryEmbedding`), so only that half is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr,  # x [T, H, D] (strided), out [T, H, D] contiguous, tables [T, D] fp32
    num_heads, stride_xt, stride_xh, stride_ct,  # heads; x's token and head strides; the tables' row stride
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (d[None, :] < HALF)
    x_row = x_ptr + t * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)  # first half of each head
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)  # second half
    cos = tl.load(cos_ptr + t * stride_ct + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + d, mask=d < HALF, other=0.0)[None, :]
    out_row = out_ptr + (t * num_heads + heads[:, None]) * (2 * HALF) + d[None, :]
    tl.store(out_row, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (unit stride in D) rotated by cos / sin [T, D] fp32 (first half == second half) -> a new
    contiguous [T, H, D] tensor of x's dtype."""
    t, h, d = x.shape
    if d % 2 or x.stride(2) != 1:
        raise ValueError(f"rope: x {tuple(x.shape)} needs an even head_dim and unit stride in it")
    if cos.shape != (t, d) or sin.shape != (t, d) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rope: tables {tuple(cos.shape)} / {tuple(sin.shape)} must be fp32 [T={t}, D={d}]")
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("rope: cos and sin need the same strides, unit stride in D")
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t == 0 or h == 0:
        return out
    block_d = triton.next_power_of_2(d // 2)
    block_h = min(triton.next_power_of_2(h), max(1, 2048 // block_d))
    _rope_kernel[(t, triton.cdiv(h, block_h))](x, out, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
                                              HALF=d // 2, BLOCK_H=block_h, BLOCK_D=block_d)
    return out


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same in plain torch, fp32 math: x [T, H, D], tables [T, D] fp32 -> [T, H, D] of x's dtype."""
    half = x.shape[-1] // 2
    x32 = x.float()
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x32[..., :half], x32[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
