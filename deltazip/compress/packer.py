"""CompressedMatrix -> packed tensors in kernels/packing.py layout (kinds sparse24 and quant)."""

import torch

from deltazip.compress.obs import CompressedMatrix
from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity
from kernels import packing


def pack_matrix(result: CompressedMatrix, spec: QuantSpec, sparsity: Sparsity) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, {role: tensor}) for one compressed matrix; 2:4 keeps only kept codes plus the meta words."""
    assert result.codes is not None and result.scales is not None
    n, k = result.codes.shape
    codes = result.codes.to(torch.int64)
    parts: dict[str, torch.Tensor] = {}
    if sparsity.is_24 and k % 32 == 0:
        kind = "sparse24"
        kept = codes[result.mask].view(n, k // 2)  # row-major boolean select keeps column order
        parts["qweight"] = packing.pack_codes(kept, spec.bits)
        parts["meta"] = packing.pack_meta(result.mask)
    else:
        kind = "quant"  # pruned entries already carry the zero code
        parts["qweight"] = packing.pack_codes(codes, spec.bits)
    parts["scales"] = result.scales.to(torch.float16)
    if result.zeros is not None:
        parts["zeros"] = result.zeros.to(torch.float16)
    return kind, {role: t.cpu().contiguous() for role, t in parts.items()}
