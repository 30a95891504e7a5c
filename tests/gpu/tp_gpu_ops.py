"""DeltaOps for the GPU TP test: packed 2:4 linears through kernels.apply_deltas (SBMM on CUDA), the rest
(norms, embeddings, dense-kind tensors) through the dense reference ops."""

from __future__ import annotations

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from kernels.delta_linear import PackedDeltaStack, apply_deltas
from services.worker.engine.dense_deltas import DenseDeltaOps


class PackedDeltaProvider:
    """{delta name: {tensor name: DeltaTensor | Tensor}} -> one PackedDeltaStack per packed linear (slot = delta)."""

    def __init__(self, deltas: dict[str, dict], tied: bool, device: torch.device) -> None:
        self.names = sorted(deltas)
        self.tied = tied
        packed_names = {k for d in deltas.values() for k, v in d.items()
                        if isinstance(v, DeltaTensor) and v.kind != "dense"}
        self.stacks = {k: PackedDeltaStack.from_packed([deltas[n][k] for n in self.names], device=device)
                       for k in packed_names}  # fmt: skip
        self.dense = {n: {k: (v.dequantize(torch.float32) if isinstance(v, DeltaTensor) else v).to(device)
                          for k, v in d.items() if k not in packed_names}
                      for n, d in deltas.items()}  # fmt: skip

    def __call__(self, segments):
        if all(name is None for name, _ in segments):
            return None
        return PackedDeltaOps(self, segments)


class PackedDeltaOps:
    def __init__(self, provider: PackedDeltaProvider, segments) -> None:
        self.p = provider
        starts = [0]
        for _, n in segments:
            starts.append(starts[-1] + n)
        self.starts = torch.tensor(starts, dtype=torch.int32)
        slots = [-1 if n is None else provider.names.index(n) for n, _ in segments]
        self.slots = torch.tensor(slots, dtype=torch.int32)
        self.dense = DenseDeltaOps(provider.dense, segments, provider.tied)

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        stack = self.p.stacks.get(name + ".weight")
        if stack is not None:
            apply_deltas(x, y, stack, self.starts, self.slots)
        self.dense.linear(name, x, y)  # biases / dense-kind weights, if any

    def norm_weight(self, name, weight, x):
        return self.dense.norm_weight(name, weight, x)

    def embedding(self, name, input_ids, h) -> None:
        self.dense.embedding(name, input_ids, h)
