"""DeltaTensor: one loaded delta, packed exactly as kernels/packing.py lays it out."""

from dataclasses import dataclass

import torch

from kernels import packing


# the tensor fields of a DeltaTensor (and of the host tier's DenseHostDelta, which has `delta` alone)
PARTS = ("qweight", "meta", "scales", "zeros", "delta")


def cpu_parts(item) -> list[torch.Tensor]:
    """The CPU tensors of a loaded delta: a tensor itself, or the PARTS of a DeltaTensor (or DenseHostDelta)."""
    if isinstance(item, torch.Tensor):
        return [item] if item.device.type == "cpu" else []
    parts = (getattr(item, part, None) for part in PARTS)
    return [t for t in parts if isinstance(t, torch.Tensor) and t.device.type == "cpu"]


@dataclass(slots=True)
class DeltaTensor:
    """Packed parts of one delta; `dequantize()` is the reference dense view."""

    name: str
    kind: str  # sparse24 | quant | dense
    shape: tuple[int, ...]
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    qweight: torch.Tensor | None = None  # int32 [N, ceil(n_kept / (32 // bits))]
    meta: torch.Tensor | None = None  # int32 [N, K // 32], sparse24 only
    scales: torch.Tensor | None = None  # fp16 [N, K // group_size] (or [N, 1])
    zeros: torch.Tensor | None = None  # fp16, asymmetric only
    delta: torch.Tensor | None = None  # fp16 dense delta, kind dense only

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Dense delta in `dtype`: the reference dequantizer for packed kinds, a cast for dense."""
        if self.kind == "dense":
            assert self.delta is not None
            return self.delta.to(dtype)
        assert self.qweight is not None and self.scales is not None
        n, k = self.shape
        return packing.dequantize(self.qweight, self.scales, self.zeros, self.meta, self.bits, (n, k), dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored parts."""
        parts = (getattr(self, f) for f in PARTS)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: str | torch.device) -> "DeltaTensor":
        """Copy of this delta with every part on `device`."""
        moved = {f: getattr(self, f) for f in PARTS}
        moved = {f: (t.to(device) if t is not None else None) for f, t in moved.items()}
        return DeltaTensor(self.name, self.kind, self.shape, self.bits, self.group_size, self.sym, **moved)
