"""Baselines sharing the OBS path's quantizer and packing: magnitude + round-to-nearest, BitDelta-style sign."""

import torch

from deltazip.compress.obs import CompressedMatrix
from deltazip.compress.quantizer import QuantSpec, dequantize, find_params, quantize
from deltazip.compress.sparsity import Sparsity

# BitDelta's sign x scale fits the 2-bit symmetric container: codes z-1 and z+1 with z = 2 are -s and +s.
BITDELTA_SPEC = QuantSpec(bits=2, group_size=None, sym=True, clip_search=False)


def magnitude_mask(w: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Keep mask [N, K] by |w|: top N of every M columns, or all but the smallest `ratio` per row."""
    n, k = w.shape
    if sparsity.structured:
        groups = w.abs().view(n, k // sparsity.group, sparsity.group)
        idx = torch.topk(groups, sparsity.keep, dim=2).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).view(n, k)
    if sparsity.ratio:
        num_pruned = int(k * sparsity.ratio)
        thresh = torch.kthvalue(w.abs(), num_pruned, dim=1, keepdim=True).values if num_pruned else None
        return w.abs() > thresh if thresh is not None else torch.ones_like(w, dtype=torch.bool)
    return torch.ones_like(w, dtype=torch.bool)


def magnitude_rtn(weight: torch.Tensor, spec: QuantSpec | None, sparsity: Sparsity) -> CompressedMatrix:
    """Prune by magnitude, then round each kept value to nearest (no Hessian, no error feedback)."""
    w = weight.detach().float()
    n, k = w.shape
    keep = magnitude_mask(w, sparsity)
    if spec is None:
        return CompressedMatrix(torch.where(keep, w, torch.zeros_like(w)), keep, None, None, None)
    gs = spec.group_size or k
    groups = spec.num_groups(k)
    wg, kg = w.view(n, groups, gs).reshape(n * groups, gs), keep.view(n, groups, gs).reshape(n * groups, gs)
    scale, zero = find_params(wg, spec, kg)  # [N*G, 1]
    codes = torch.where(kg, quantize(wg, scale, zero, spec.maxq), zero.expand_as(wg))
    deq = torch.where(kg, dequantize(codes, scale, zero), torch.zeros_like(wg))
    return CompressedMatrix(
        dequantized=deq.view(n, k),
        mask=keep,
        codes=codes.view(n, k).to(torch.int16),
        scales=scale.view(n, groups),
        zeros=None if spec.sym else zero.view(n, groups),
    )


def bitdelta(weight: torch.Tensor) -> CompressedMatrix:
    """sign(W) * mean|W| (one scale per matrix, no distillation), stored as 2-bit symmetric codes."""
    w = weight.detach().float()
    n, k = w.shape
    alpha = w.abs().mean().half().float().clamp(min=2.0**-24)
    z = BITDELTA_SPEC.sym_zero
    codes = (torch.sign(w) + z).to(torch.int16)  # 1, 2 (exact zero), 3
    scales = torch.full((n, 1), float(alpha), device=w.device)
    return CompressedMatrix(
        dequantized=(codes.float() - z) * alpha,
        mask=torch.ones_like(w, dtype=torch.bool),
        codes=codes,
        scales=scales,
        zeros=None,
    )
