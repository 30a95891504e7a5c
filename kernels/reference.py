"""Torch reference for SBMM: dequantize each segment's delta in plain torch, then multiply.

Semantics shared with the Triton kernel (kernels/sbmm.py): for every segment s with a valid slot,
    y[a:b] = (y[a:b].float() + x[a:b].float() @ W.float().T).to(y.dtype),   a, b = seg_starts[s], seg_starts[s+1]
where W = dequantize(Δ_slot) rounded to the activation dtype (the kernel feeds W to the tensor cores in
that dtype) and the product is accumulated in fp32. Segments with slot -1 are left untouched.
"""

import torch

from kernels import packing


def dequantize_slot(
    qweight: torch.Tensor,
    meta: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """One slot's packed delta -> dense [N, K] in `dtype` (dequantized in fp32, then rounded once)."""
    return packing.dequantize(qweight, scales, zeros, meta, bits, shape, torch.float32).to(dtype)


def sbmm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    qweight: torch.Tensor,
    meta: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
) -> None:
    """In place y[seg] += x[seg] @ dequant(Δ_slot).T; packed tensors stacked by slot: qweight [num_slots, N, W]."""
    weight_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    dense: dict[int, torch.Tensor] = {}  # slot -> [N, K] fp32, dequantized once per call
    for s, slot in enumerate(slots):
        a, b = starts[s], starts[s + 1]
        if slot < 0 or b <= a:
            continue
        if slot not in dense:
            z = zeros[slot] if zeros is not None else None
            m = meta[slot] if meta is not None else None
            w = dequantize_slot(qweight[slot], m, scales[slot], z, bits, shape, weight_dtype)
            dense[slot] = w.float()
        y[a:b] = (y[a:b].float() + x[a:b].float() @ dense[slot].T).to(y.dtype)


def dense_reference(
    x: torch.Tensor, y: torch.Tensor, deltas: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor
) -> None:
    """In place y[seg] += x[seg] @ deltas[slot].T for dense deltas [num_slots, N, K], fp32 accumulation."""
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    for s, slot in enumerate(slots):
        a, b = starts[s], starts[s + 1]
        if slot < 0 or b <= a:
            continue
        w = deltas[slot].to(x.dtype).float()  # [N, K]
        y[a:b] = (y[a:b].float() + x[a:b].float() @ w.T).to(y.dtype)
