"""Column- and row-parallel linears. Both keep the HF name and call the delta hook with this rank's
shard of the input/output, so a DeltaOps built from the rank's delta shards applies exactly as unsharded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltazip.model.context import DeltaOps
from deltazip.model.layers import NamedLinear
from deltazip.parallel.group import TPGroup


def _linear_on_meta(cls: type[NamedLinear], weight: torch.Tensor, bias: torch.Tensor | None) -> NamedLinear:
    """Build `cls` around existing tensors without allocating a throwaway weight."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        module = cls(in_features, out_features, bias=bias is not None)
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    return module


class ColumnParallelLinear(NamedLinear):
    """Holds rows [start, end) of W (out features); y is this rank's slice of the output, no communication."""

    @classmethod
    def from_shard(cls, hf_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> ColumnParallelLinear:
        """weight: [out/tp, in], bias: [out/tp] or None."""
        module = _linear_on_meta(cls, weight, bias)
        module.hf_name = hf_name
        return module


class RowParallelLinear(NamedLinear):
    """Holds columns [start, end) of W (in features); partial sums (base + delta) are all-reduced, then bias."""

    tp: TPGroup = TPGroup()

    @classmethod
    def from_shard(
        cls, hf_name: str, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup
    ) -> RowParallelLinear:
        """weight: [out, in/tp]; bias: the full [out] bias (added once, after the reduce) or None."""
        module = _linear_on_meta(cls, weight, bias)
        module.hf_name = hf_name
        module.tp = tp
        return module

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, in/tp] (this rank's heads / intermediate slice) -> y: [N, out], identical on every rank
        y = F.linear(x, self.weight)
        if deltas is not None:
            deltas.linear(self.hf_name, x, y)  # x @ Δ[:, shard].T: a partial sum like the base's
        self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
