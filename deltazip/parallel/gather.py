"""Cut a rank's slice out of a full tensor (or a safetensors slice): a plain narrow, or for padded layouts
the concatenation of original ranges and zero blocks along the split dim."""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltazip.parallel.plan import TensorSplit


def take(t: torch.Tensor, split: TensorSplit) -> torch.Tensor:
    """t's rank slice along split.dim (a fresh contiguous tensor); zero runs become zeros of t's dtype."""
    if split.contiguous:
        return t.narrow(split.dim, split.start, split.size).clone(memory_format=torch.contiguous_format)
    return _concat(lambda a, n: t.narrow(split.dim, a, n), split, t.shape, t.dtype, t.device)


def read_split(get_slice, shape: tuple[int, ...], split: TensorSplit) -> torch.Tensor:
    """The rank slice read from a safetensors `get_slice` handle: only the rank's bytes leave the file."""

    def rows(a: int, n: int) -> torch.Tensor:
        return get_slice[a : a + n] if split.dim == 0 else get_slice[:, a : a + n]

    if split.contiguous:
        return rows(split.start, split.size)
    probe = rows(0, 1)  # dtype of the zero blocks
    return _concat(rows, split, shape, probe.dtype, probe.device)


def _concat(piece: Callable[[int, int], torch.Tensor], split: TensorSplit, shape, dtype, device) -> torch.Tensor:
    parts = []
    for a, n in split.runs:
        if a >= 0:
            parts.append(piece(a, n))
        else:
            zshape = list(shape)
            zshape[split.dim] = n
            parts.append(torch.zeros(zshape, dtype=dtype, device=device))
    return torch.cat(parts, dim=split.dim).contiguous()
