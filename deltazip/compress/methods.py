"""Method selector: how one stage's matrices (sharing an input Hessian) are compressed."""

from dataclasses import dataclass

import torch

from deltazip.compress.baselines import BITDELTA_SPEC, bitdelta, magnitude_rtn
from deltazip.compress.config import CompressConfig
from deltazip.compress.obs import CompressedMatrix, obs_compress
from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity


@dataclass(slots=True)
class MatrixResult:
    """One compressed matrix and the settings its packing needs."""

    result: CompressedMatrix
    spec: QuantSpec
    sparsity: Sparsity
    absolute: bool  # True when `result` approximates the fine-tuned weight itself, not the delta


def effective_spec(cfg: CompressConfig, in_features: int) -> QuantSpec:
    """The configured quantizer; a group as wide as the row (or wider) means per-row scales."""
    spec = cfg.quant_spec()
    if spec.group_size is not None and spec.group_size >= in_features:
        return QuantSpec(spec.bits, None, spec.sym, spec.clip_search)
    spec.num_groups(in_features)  # raises when K is not a multiple of the group size
    return spec


def compress_stage(
    cfg: CompressConfig, deltas: list[torch.Tensor], ft_weights: list[torch.Tensor], hessian: torch.Tensor
) -> list[MatrixResult]:
    """Compress matrices [N_i, K] that share the input Hessian [K, K]."""
    k = deltas[0].shape[1]
    spec, sparsity = effective_spec(cfg, k), cfg.sparsity_spec()
    if cfg.method == "bitdelta":
        return [MatrixResult(bitdelta(d), BITDELTA_SPEC, Sparsity(), False) for d in deltas]
    if cfg.method == "magnitude_rtn":
        return [MatrixResult(magnitude_rtn(d, spec, sparsity), spec, sparsity, False) for d in deltas]
    absolute = cfg.method == "sparsegpt_full"
    targets = ft_weights if absolute else deltas
    # Rows are independent given H: one stacked OBS pass serves q/k/v (or gate/up) together.
    stacked = obs_compress(torch.cat(targets), hessian, spec, sparsity, cfg.block_size, cfg.damp)
    out, start = [], 0
    for t in targets:
        out.append(MatrixResult(stacked.rows(start, start + t.shape[0]), spec, sparsity, absolute))
        start += t.shape[0]
    return out


def output_rel_error(error: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X E^T|| / ||X D^T|| on the calibration inputs, from H = 2 X^T X / n (no activations needed)."""
    num = float(((error @ hessian) * error).sum())
    den = float(((target @ hessian) * target).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0
