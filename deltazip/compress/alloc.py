"""Per-tensor allocation under a byte budget: each block linear gets one option the serving kernels run
(4-bit 2:4, 2-bit 2:4) or is dropped (no delta), so that the estimated loss increase is smallest.

Each option of a tensor has a cost (bytes it adds on disk) and a loss (the estimated increase of the
calibration loss, `weighted_output_loss`). Only options on the lower convex hull of (bytes, loss) can be
optimal for some budget; starting from every tensor at its cheapest option (drop), upgrades along the hulls
are taken in order of loss saved per byte while they fit. This is the Lagrangian (equal-slope) solution of
the multiple-choice knapsack, exact up to the last upgrade that did not fit.
"""

from collections import Counter
from dataclasses import dataclass

import torch

DROP = "drop"
HEADER_BYTES_PER_KEY = 96  # a safetensors header entry: key name, dtype, shape, offsets (JSON)
_ZSTD_LEVEL = 10  # what `--lossless zstd` writes (deltazip/artifact/writer.py)


def option_name(bits: int) -> str:
    """Name of a packed option: '4b-24', '2b-24'."""
    return f"{bits}b-24"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to store one tensor: what it costs on disk and what it is estimated to cost in loss."""

    option: str  # option_name(bits) or DROP
    num_bytes: int
    loss: float


def weighted_output_loss(error: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """1/2 sum_j F_j * mean_x (x . e_j)^2 for error E [N, K], H = 2 X^T X / n [K, K] and output Fisher F [N]
    (mean squared loss gradient per output feature): the second-order (empirical Fisher, K-FAC-factored)
    estimate of the loss increase of adding E to the layer. F None weighs every output alike (plain output error)."""
    per_row = ((error @ hessian) * error).sum(dim=1) / 2  # [N]: mean_x (x . e_j)^2
    if fisher is not None:
        per_row = per_row * fisher.to(per_row.device, per_row.dtype)
    return 0.5 * float(per_row.sum().clamp(min=0))


def stored_bytes(parts: dict[str, torch.Tensor], codec: str) -> int:
    """Bytes these safetensors parts add to a shard on disk: raw, or zstd-compressed at the writer's level
    (compressed alone; `zstd_shard_factor` corrects for what a whole shard compresses better)."""
    header = HEADER_BYTES_PER_KEY * len(parts)
    if codec == "none":
        return header + sum(t.numel() * t.element_size() for t in parts.values())
    return header + len(_zstd(_raw(parts)))


def zstd_shard_factor(samples: list[dict[str, torch.Tensor]], max_bytes: int = 256 << 20) -> float:
    """zstd size of these part sets compressed as one stream (as a shard is) / the sum of their sizes
    compressed one by one, over the first `max_bytes` of them; 1.0 without samples."""
    raws: list[bytes] = []
    for parts in samples:
        raws.append(_raw(parts))
        if sum(map(len, raws)) >= max_bytes:
            break
    alone = sum(len(_zstd(r)) for r in raws)
    return len(_zstd(b"".join(raws))) / alone if alone else 1.0


def zstd_stream_bytes(samples: list[dict[str, torch.Tensor]]) -> int:
    """zstd size of these part sets compressed as one stream, as the writer compresses a shard."""
    return len(_zstd(b"".join(_raw(parts) for parts in samples)))


def _raw(parts: dict[str, torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts.values())


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=-1).compress(data)


def lower_hull(candidates: list[Candidate]) -> list[Candidate]:
    """Options that are optimal for some price per byte: cheapest first, loss strictly falling, convex."""
    hull: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.num_bytes, c.loss)):
        if hull and c.loss >= hull[-1].loss:
            continue  # costs more and loses no less
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], c):
            hull.pop()  # hull[-1] saves less per byte than going straight to c
        hull.append(c)
    return hull


def _slope(a: Candidate, b: Candidate) -> float:
    """Loss saved per extra byte from a to b (b costs more)."""
    return (a.loss - b.loss) / max(b.num_bytes - a.num_bytes, 1)


def allocate(candidates: dict[str, list[Candidate]], budget_bytes: float) -> dict[str, Candidate]:
    """The chosen candidate per tensor: total bytes <= budget_bytes, greedy on loss saved per byte."""
    hulls = {name: lower_hull(cands) for name, cands in candidates.items()}
    chosen = {name: hull[0] for name, hull in hulls.items()}
    used = sum(c.num_bytes for c in chosen.values())
    if used > budget_bytes:
        raise ValueError(f"the byte budget {budget_bytes:,.0f} is below the cheapest allocation ({used:,} bytes)")
    steps = [(_slope(h[i], h[i + 1]), name, i) for name, h in hulls.items() for i in range(len(h) - 1)]
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _, name, i in steps:
        old, new = hulls[name][i], hulls[name][i + 1]
        if chosen[name] is not old:
            continue  # an earlier step of this tensor did not fit
        extra = new.num_bytes - old.num_bytes
        if used + extra <= budget_bytes:
            chosen[name], used = new, used + extra
    return chosen


def allocation_record(chosen: dict[str, Candidate], budget_bytes: float, fixed_bytes: int) -> dict:
    """The manifest's `compression.allocation`: counts and bytes per option, the dropped tensors."""
    counts = Counter(c.option for c in chosen.values())
    option_bytes: Counter = Counter()
    for c in chosen.values():
        option_bytes[c.option] += c.num_bytes
    return {
        "counts": dict(sorted(counts.items())),
        "bytes": dict(sorted(option_bytes.items())),
        "budget_bytes": int(budget_bytes),
        "fixed_bytes": fixed_bytes,
        "estimated_loss": sum(c.loss for c in chosen.values()),
        "dropped": sorted(n for n, c in chosen.items() if c.option == DROP),
    }
