"""A rank's shard of one delta, cut at load time from the single (unsharded) artifact.

Column-parallel tensors (split dim 0) slice rows of every part. Row-parallel tensors (split dim 1)
slice in-features; for packed kinds that means cutting qweight/meta/scales/zeros at word and group
boundaries (kernels/packing.py layout), so a shard is itself a valid packed tensor whose dequantized
value is exactly the slice of the full dequantized delta.
"""

from __future__ import annotations

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.parallel.plan import ShardPlan, TensorSplit
from kernels import packing

MISALIGNED_MODES = ("error", "dense")


def shard_delta(
    deltas: dict[str, DeltaTensor | torch.Tensor], plan: ShardPlan, misaligned: str = "error"
) -> dict[str, DeltaTensor | torch.Tensor]:
    """{HF tensor name: delta} -> this rank's {name: shard}; replicated tensors are shared, not copied.

    misaligned: "error" raises ValueError when a packed row-parallel shard would cut a quantization group;
    "dense" stores such a shard as a dense fp32 delta instead (exact values, more memory).
    """
    if misaligned not in MISALIGNED_MODES:
        raise ValueError(f"misaligned={misaligned!r}; use one of {MISALIGNED_MODES}")
    out: dict[str, DeltaTensor | torch.Tensor] = {}
    for name, delta in deltas.items():
        if plan.is_row_parallel_bias(name) and plan.rank != 0:
            continue  # the all-reduce would add it tp times
        split = plan.split(name)
        if split is None:
            out[name] = delta
        elif isinstance(delta, torch.Tensor):
            out[name] = delta.narrow(split.dim, split.start, split.end - split.start).contiguous()
        else:
            out[name] = shard_delta_tensor(delta, split, misaligned)
    return out


def shard_delta_tensor(t: DeltaTensor, split: TensorSplit, misaligned: str = "error") -> DeltaTensor:
    """The slice `split` of one DeltaTensor, in the same kind and layout when possible."""
    n, k = t.shape if len(t.shape) == 2 else (t.shape[0], 1)
    if split.dim == 1 and len(t.shape) != 2:
        raise ValueError(f"{t.name}: cannot split a {len(t.shape)}-d tensor along in-features")
    if t.kind == "dense":
        assert t.delta is not None
        part = t.delta.narrow(split.dim, split.start, split.end - split.start).contiguous()
        return _like(t, tuple(part.shape), delta=part)
    if split.dim == 0:
        rows = slice(split.start, split.end)
        parts = {f: _rows(getattr(t, f), rows) for f in ("qweight", "meta", "scales", "zeros")}
        return _like(t, (split.end - split.start, k), **parts)
    return _shard_in_features(t, split.start, split.end, k, misaligned)


def _shard_in_features(t: DeltaTensor, a: int, b: int, k: int, misaligned: str) -> DeltaTensor:
    """Cut in-features [a, b) of a packed delta [N, K]."""
    assert t.qweight is not None and t.scales is not None and t.bits is not None
    sparse = t.meta is not None
    if sparse and (a % 32 or b % 32):
        raise ValueError(
            f"{t.name}: 2:4 delta [{t.shape[0]}, {k}] cannot be split at in-features {a}:{b}; "
            "each rank's share of K must be a multiple of 32 (choose a TP size that gives that)"
        )
    num_groups = t.scales.shape[1]
    group = k // num_groups
    per_row = num_groups == 1
    if not per_row and (a % group or b % group):
        if misaligned == "dense":
            full = t.dequantize(torch.float32)  # [N, K]; fp32 keeps the exact values, the dense stack casts
            return _like(t, (t.shape[0], b - a), kind="dense", bits=None, group_size=None, sym=None,
                         delta=full[:, a:b].contiguous())  # fmt: skip
        raise ValueError(
            f"{t.name}: in-features {a}:{b} of K={k} cut through quantization groups of {group} columns; "
            "each rank's share of K must be a multiple of the group size (or shard with misaligned='dense')"
        )
    groups = slice(0, 1) if per_row else slice(a // group, b // group)
    kept_a, kept_b = (a // 2, b // 2) if sparse else (a, b)
    qweight = _slice_codes(t.qweight, t.bits, kept_a, kept_b, kept_total=k // 2 if sparse else k)
    meta = t.meta[:, a // 32 : b // 32].contiguous() if sparse else None
    zeros = t.zeros[:, groups].contiguous() if t.zeros is not None else None
    group_size = (b - a) if per_row and t.group_size == k else t.group_size
    return _like(t, (t.shape[0], b - a), group_size=group_size, qweight=qweight, meta=meta,
                 scales=t.scales[:, groups].contiguous(), zeros=zeros)  # fmt: skip


def _slice_codes(qweight: torch.Tensor, bits: int, a: int, b: int, kept_total: int) -> torch.Tensor:
    """Codes [a, b) of each row, packed again: a word slice when aligned, else unpack + repack (exact)."""
    per = packing.codes_per_word(bits)
    if a % per == 0 and (b % per == 0 or b == kept_total):
        return qweight[:, a // per : -(-b // per)].contiguous()
    codes = packing.unpack_codes(qweight, bits, kept_total)[:, a:b]  # e.g. 3-bit: 10 codes per word
    return packing.pack_codes(codes, bits)


def _rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[rows].contiguous()


def _like(t: DeltaTensor, shape: tuple[int, ...], **changes) -> DeltaTensor:
    """A DeltaTensor with t's metadata, the given shape and the given fields replaced."""
    fields = dict(name=t.name, kind=t.kind, shape=shape, bits=t.bits, group_size=t.group_size, sym=t.sym,
                  qweight=t.qweight, meta=t.meta, scales=t.scales, zeros=t.zeros, delta=t.delta)  # fmt: skip
    fields.update(changes)
    if fields["kind"] == "dense":
        fields.update(qweight=None, meta=None, scales=None, zeros=None)
    return DeltaTensor(**fields)
