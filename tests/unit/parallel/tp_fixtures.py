"""Random packed deltas, whole-model deltas and paged-attention metadata for the TP tests."""

from __future__ import annotations

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.model.context import AttentionMetadata
from kernels import packing


def random_packed_delta(
    name: str, n: int, k: int, bits: int, group_size: int | None, sym: bool, sparse: bool, seed: int = 0
) -> DeltaTensor:
    """A random DeltaTensor in the kernels/packing.py layout; group_size None = per-row scales."""
    g = torch.Generator().manual_seed(seed)
    kept = k // 2 if sparse else k
    meta = None
    if sparse:
        keep = torch.rand(n, k // 4, 4, generator=g).argsort(dim=-1)[..., :2]
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)
        meta = packing.pack_meta(mask)
    codes = torch.randint(0, 1 << bits, (n, kept), generator=g)
    num_groups = 1 if group_size is None else k // group_size
    scales = (torch.rand(n, num_groups, generator=g) * 0.01 + 0.001).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, num_groups), generator=g).half()
    return DeltaTensor(
        name=name, kind="sparse24" if sparse else "quant", shape=(n, k), bits=bits,
        group_size=k if group_size is None else group_size, sym=sym,
        qweight=packing.pack_codes(codes, bits), meta=meta, scales=scales, zeros=zeros,
    )  # fmt: skip


def dense_model_delta(state: dict[str, torch.Tensor], seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A dense delta for every tensor of the model (norms, embeddings, biases included)."""
    g = torch.Generator().manual_seed(seed)
    return {k: std * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def packed_model_delta(
    state: dict[str, torch.Tensor], seed: int, group_size: int = 32
) -> dict[str, DeltaTensor | torch.Tensor]:
    """2:4 4-bit asymmetric grouped deltas for the layers' linears, dense deltas (state's dtype) for the rest."""
    dense = dense_model_delta(state, seed)
    out: dict[str, DeltaTensor | torch.Tensor] = {}
    for i, (name, w) in enumerate(sorted(state.items())):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            n, k = w.shape
            out[name] = random_packed_delta(name, n, k, bits=4, group_size=group_size, sym=False, sparse=True,
                                            seed=seed + i)
        else:
            out[name] = dense[name]
    return out


def dequantized(deltas: dict[str, DeltaTensor | torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every delta as a dense tensor (the form DenseDeltaOps applies)."""
    return {k: (v.dequantize(dtype) if isinstance(v, DeltaTensor) else v.to(dtype)) for k, v in deltas.items()}


def paged_metadata(
    cached: list[int], new: list[int], block_size: int, blocks_per_seq: int
) -> AttentionMetadata:
    """Sequence i has cached[i] tokens in its cache and new[i] new ones; it owns blocks i*bps .. (i+1)*bps-1."""
    positions, slots, qsl = [], [], [0]
    for i, (c, n) in enumerate(zip(cached, new)):
        for p in range(c, c + n):
            positions.append(p)
            slots.append((i * blocks_per_seq + p // block_size) * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
    tables = [[i * blocks_per_seq + b for b in range(blocks_per_seq)] for i in range(len(cached))]
    ctx_lens = [c + n for c, n in zip(cached, new)]
    return AttentionMetadata(
        positions=torch.tensor(positions), slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables),
        context_lens=torch.tensor(ctx_lens), query_start_loc=torch.tensor(qsl),
        max_query_len=max(new), max_context_len=max(ctx_lens),
    )  # fmt: skip
