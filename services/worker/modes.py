"""Serving modes of one worker: the DeltaZip mode and the two baselines, run by the same engine.

- `delta`: compressed deltas stay packed on the device; each batch runs the base once plus SBMM per delta.
- `dense-delta`: the same batching over uncompressed fp16 deltas (compressed artifacts dequantized at load).
- `swap`: whole merged fine-tuned weights in pinned host memory, copied into the model one model at a time
  (like vLLM model swapping); requests of other models wait.

One selector (`select_mode`); each mode only changes what the host tier holds (`host_tensors`) and
whether the engine swaps weights. An unknown name raises ValueError listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

HostTransform = Callable[[dict], dict]


@dataclass(frozen=True, slots=True)
class WorkerMode:
    name: str
    swaps_weights: bool  # True: the engine swaps merged weights; device slots hold nothing


MODES: dict[str, WorkerMode] = {
    "delta": WorkerMode("delta", swaps_weights=False),
    "dense-delta": WorkerMode("dense-delta", swaps_weights=False),
    "swap": WorkerMode("swap", swaps_weights=True),
}


def select_mode(name: str) -> WorkerMode:
    """The mode called `name`; ValueError naming the valid modes otherwise."""
    mode = MODES.get(name)
    if mode is None:
        raise ValueError(f"unknown worker mode {name!r}; valid modes: {', '.join(MODES)}")
    return mode


@dataclass(slots=True)
class DenseHostDelta:
    """A dense fp16 delta in the DeltaTensor shape (what DeviceSlots stores as a `dense` stack)."""

    delta: torch.Tensor
    kind: str = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    @property
    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()


def dense_fp16(tensors: dict) -> dict:
    """dense-delta mode: every tensor as uncompressed fp16 (dense artifacts kept as they are)."""
    out = {}
    for name, delta in tensors.items():
        if delta.kind == "dense" and delta.delta.dtype == torch.float16:
            out[name] = delta
        else:
            out[name] = DenseHostDelta(delta.dequantize(torch.float16))
    return out


def merged_weights(base: dict[str, torch.Tensor], tensors: dict) -> dict[str, torch.Tensor]:
    """swap mode: the full fine-tuned weights W_base + Δ (every parameter, as a swap copies all of them)."""
    merged = dict(base)
    for name, delta in tensors.items():
        w = base.get(name)
        if w is None:
            continue  # e.g. lm_head of a tied model: it is the embedding parameter
        merged[name] = (w.float() + delta.dequantize(torch.float32).to(w.device)).to(w.dtype)
    return merged


def host_transform(mode: WorkerMode, base_host: dict[str, torch.Tensor] | None) -> HostTransform:
    """What a delta artifact becomes in the host tier under `mode`."""
    if mode.name == "dense-delta":
        return dense_fp16
    if mode.name == "swap":
        assert base_host is not None, "swap mode needs the base's host weights"
        return lambda tensors: merged_weights(base_host, tensors)
    return lambda tensors: tensors
