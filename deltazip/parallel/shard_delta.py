"""A rank's shard of one delta, cut at load time from the single (unsharded) artifact.

Column-parallel tensors (split dim 0) slice rows of every part. Row-parallel tensors (split dim 1)
slice in-features; for packed kinds that means cutting qweight/meta/scales/zeros at word and group
boundaries (kernels/packing.py layout), so a shard is itself a valid packed tensor whose dequantized
value is exactly the slice of the full dequantized delta.
"""

from __future__ import annotations

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.parallel.gather import take
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
            out[name] = take(delta, split)
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
        part = take(t.delta, split)
        return _like(t, tuple(part.shape), delta=part)
    if not split.contiguous:
        return _gather(t, split, k, misaligned)
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
        if misaligned == "dense":
            return _dense_slice(t, TensorSplit(1, a, b))
        raise ValueError(
            f"{t.name}: 2:4 delta [{t.shape[0]}, {k}] cannot be split at in-features {a}:{b}; "
            "each rank's share of K must be a multiple of 32 (choose a TP size that gives that)"
        )
    num_groups = t.scales.shape[1]
    group = k // num_groups
    per_row = num_groups == 1
    if not per_row and (a % group or b % group):
        if misaligned == "dense":
            return _dense_slice(t, TensorSplit(1, a, b))
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


VALID_META_WORD = 0x44444444  # every 4-column group keeps columns 0 and 1: a valid 2:4 pattern for zero blocks


def _gather(t: DeltaTensor, split: TensorSplit, k: int, misaligned: str) -> DeltaTensor:
    """A padded-layout shard: original ranges and zero blocks concatenated along split.dim, still packed."""
    if split.dim == 0:
        parts = {f: _gather_rows(getattr(t, f), split.runs, VALID_META_WORD if f == "meta" else 0)
                 for f in ("qweight", "meta", "scales", "zeros")}  # fmt: skip
        return _like(t, (split.size, k), **parts)
    try:
        return _gather_in_features(t, split, k)
    except ValueError:
        if misaligned != "dense":
            raise
        return _dense_slice(t, split)


def _dense_slice(t: DeltaTensor, split: TensorSplit) -> DeltaTensor:
    """The slice as an exact dense fp32 delta (more memory; the dense stack casts it)."""
    part = take(t.dequantize(torch.float32), split)
    return _like(t, tuple(part.shape), kind="dense", bits=None, group_size=None, sym=None, delta=part)


def _gather_rows(x: torch.Tensor | None, runs, fill: int) -> torch.Tensor | None:
    if x is None:
        return None
    parts = [x[a : a + n] if a >= 0 else torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
             for a, n in runs]  # fmt: skip
    return torch.cat(parts).contiguous()


def _gather_in_features(t: DeltaTensor, split: TensorSplit, k: int) -> DeltaTensor:
    """In-feature ranges of a packed [N, K] delta plus zero groups; ValueError when a cut is misaligned."""
    assert t.qweight is not None and t.scales is not None and t.bits is not None
    sparse, n = t.meta is not None, t.shape[0]
    group = k // t.scales.shape[1]
    if t.scales.shape[1] == 1:
        raise ValueError(f"{t.name}: per-row scales cannot take zero in-feature blocks")
    codes, metas, scales, zeros = [], [], [], []
    for a, size in split.runs:
        if a >= 0:
            p = _shard_in_features(t, a, a + size, k, "error")
            codes.append(packing.unpack_codes(p.qweight, t.bits, size // 2 if sparse else size))
            metas.append(p.meta)
            scales.append(p.scales)
            zeros.append(p.zeros)
            continue
        if size % group or (sparse and size % 32):
            raise ValueError(f"{t.name}: a zero block of {size} in-features is not a whole number of groups")
        codes.append(torch.zeros(n, size // 2 if sparse else size, dtype=torch.int64, device=t.qweight.device))
        if sparse:
            metas.append(torch.full((n, size // 32), VALID_META_WORD, dtype=t.meta.dtype, device=t.meta.device))
        scales.append(torch.zeros(n, size // group, dtype=t.scales.dtype, device=t.scales.device))
        if t.zeros is not None:
            zeros.append(torch.zeros(n, size // group, dtype=t.zeros.dtype, device=t.zeros.device))
    return _like(t, (n, split.size), qweight=packing.pack_codes(torch.cat(codes, 1), t.bits),
                 meta=torch.cat(metas, 1).contiguous() if sparse else None,
                 scales=torch.cat(scales, 1).contiguous(),
                 zeros=torch.cat(zeros, 1).contiguous() if t.zeros is not None else None)  # fmt: skip


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
