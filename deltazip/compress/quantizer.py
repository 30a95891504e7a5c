"""Uniform quantizer in the packed format's convention: value = (code - zero) * scale, scales fp16.

Symmetric uses the implicit zero 2**(bits-1); asymmetric stores integer zeros (so code == zero is exactly 0).
Scales are rounded to fp16 before any code is chosen, so what we measure is what the kernel will compute.
"""

from dataclasses import dataclass

import torch

FP16_TINY = 2.0**-24  # smallest fp16 subnormal: a scale must stay representable


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """How to quantize: bits, group size along K (None = one group per row), symmetry, clip search."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    clip_search: bool = True  # grid-search a shrink of the range that minimizes (weighted) error

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of (2, 3, 4, 8), got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 4):
            raise ValueError(f"group_size must be a positive multiple of 4 or None (per row), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def num_groups(self, k: int) -> int:
        """Groups per row for K input features."""
        if self.group_size is None:
            return 1
        if k % self.group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {self.group_size}")
        return k // self.group_size


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of w [N, C] with per-row scale/zero [N, 1] (or broadcastable): round-to-nearest, clamped."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(code - zero) * scale, in fp32."""
    return (codes - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize then dequantize."""
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def find_params(
    w: torch.Tensor,
    spec: QuantSpec,
    keep: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    grid: int = 50,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) [N, 1] for the values of w [N, C] marked in `keep` (default all).

    With clip_search, tries range shrinks 1, 1-1/grid, ... and keeps, per row, the one with the least
    sum of col_weight * (fake_quant(w) - w)^2 over kept values (col_weight: [C], e.g. diag of the Hessian).
    """
    w = w.float()
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    kept = torch.where(keep, w, torch.zeros_like(w))
    xmin = torch.clamp(kept.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(kept.max(dim=1, keepdim=True).values, min=0)
    if not spec.clip_search:
        return _params(xmin, xmax, spec)
    weight = keep.float() * (col_weight.float().view(1, -1) if col_weight is not None else 1.0)
    best_scale, best_zero = _params(xmin, xmax, spec)
    best_err = _error(w, weight, best_scale, best_zero, spec.maxq)
    for i in range(1, int(max_shrink * grid)):
        p = 1.0 - i / grid
        scale, zero = _params(xmin * p, xmax * p, spec)
        err = _error(w, weight, scale, zero, spec.maxq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _params(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) from a range; scale rounded to fp16, zero an integer."""
    if spec.sym:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, float(spec.sym_zero))
    else:
        scale = (xmax - xmin) / spec.maxq
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    scale = scale.half().float().clamp(min=FP16_TINY)
    if not spec.sym:
        zero = torch.clamp(torch.round(-xmin / scale), 0, spec.maxq)
    return scale, zero


def _error(w: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    diff = fake_quantize(w, scale, zero, maxq) - w
    return (diff.pow(2) * weight).sum(dim=1, keepdim=True)
