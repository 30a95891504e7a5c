"""Embedding and lm_head deltas, packed like the linears when `embeddings="compress"` (default: fp16).

lm_head is a linear on the final-norm outputs, so it gets the configured method with that Hessian. An
embedding row is looked up alone, with no inputs to mix columns, so its delta gets magnitude pruning and
round-to-nearest per row (BitDelta's sign x scale under that method).
"""

import torch

from deltazip.compress.baselines import BITDELTA_SPEC, bitdelta, magnitude_rtn
from deltazip.compress.config import CompressConfig
from deltazip.compress.hessian import HessianAccumulator
from deltazip.compress.methods import MatrixResult, compress_stage, effective_spec
from deltazip.compress.sparsity import Sparsity

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


def final_norm_hessian(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """H of lm_head's inputs: RMSNorm(hidden) * weight over all calibration tokens. hidden: [S, L, H]."""
    acc = HessianAccumulator(hidden.shape[-1], hidden.device)
    weight = norm_weight.to(hidden.device, torch.float32)
    for sample in hidden:  # [L, H] at a time keeps the fp32 copy small
        x = sample.float()
        acc.add(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight)
    return acc.hessian


def compress_outer(
    cfg: CompressConfig, name: str, delta: torch.Tensor, ft_weight: torch.Tensor, hessian: torch.Tensor | None
) -> MatrixResult:
    """Compressed embedding or lm_head delta (lm_head needs `hessian`)."""
    if name == LM_HEAD:
        assert hessian is not None
        return compress_stage(cfg, [delta], [ft_weight], hessian)[0]
    if cfg.method == "bitdelta":
        return MatrixResult(bitdelta(delta), BITDELTA_SPEC, Sparsity(), False)
    spec, sparsity = effective_spec(cfg, delta.shape[1]), cfg.sparsity_spec()
    return MatrixResult(magnitude_rtn(delta, spec, sparsity), spec, sparsity, False)
