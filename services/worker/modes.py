"""Serving modes of one worker: the DeltaZip mode and the two baselines, run by the same engine.

- `delta`: compressed deltas stay packed on the device; each batch runs the base once plus SBMM per delta.
- `dense-delta`: the same batching over uncompressed fp16 deltas (compressed artifacts dequantized at load).
- `swap`: whole merged fine-tuned weights in pinned host memory, copied into the model one model at a time
  (like vLLM model swapping); requests of other models wait.

One selector (`select_mode`); each mode only changes what the host tier holds (`host_tensors`) and
whether the engine swaps weights. An unknown name raises ValueError listing the valid ones.

The baselines' host transforms (dequantize, merge) run on the worker's GPU when it has one (`DeviceMath`): on the
CPU a 7B-shaped merge takes seconds per fine-tune, which would make a swap or dense-delta load pay for our CPU, not
for what the baseline moves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch

from deltazip.logs import get_logger

HostTransform = Callable[[dict], dict]
HostEstimate = Callable[[str, int], int]  # (artifact dir, bytes on disk) -> bytes its host form will hold
log = get_logger("services.worker.modes")


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


class DeviceMath:
    """Runs a host transform's per-tensor arithmetic on a CUDA device, on its own stream, result in pinned host
    memory. One tensor at a time (the loader threads take turns), so the scratch it needs on the device is one
    weight's worth; a step of the engine on the default stream is not ordered behind it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device)
        self._lock = threading.Lock()
        self._fell_back = False

    def __call__(self, fn: Callable[[torch.device], torch.Tensor]) -> torch.Tensor:
        """fn(device) computed on the device and copied back pinned; fn on the CPU if the device has no room."""
        with self._lock:
            try:
                with torch.cuda.stream(self._stream):
                    result = fn(self.device)
                    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                    host.copy_(result, non_blocking=True)
                    self._stream.synchronize()
                    return host
            except torch.cuda.OutOfMemoryError:
                if not self._fell_back:
                    log.warning("host_transform_on_cpu", reason="device out of memory", device=str(self.device))
                    self._fell_back = True
        return fn(torch.device("cpu"))


def _compute(math: DeviceMath | None, fn: Callable[[torch.device], torch.Tensor]) -> torch.Tensor:
    return fn(torch.device("cpu")) if math is None else math(fn)


def dense_fp16(tensors: dict, math: DeviceMath | None = None) -> dict:
    """dense-delta mode: every tensor as uncompressed fp16 (dense artifacts kept as they are)."""
    out = {}
    for name, delta in tensors.items():
        if delta.kind == "dense" and delta.delta.dtype == torch.float16:
            out[name] = delta
        else:
            out[name] = DenseHostDelta(_compute(math, lambda dev, d=delta: d.to(dev).dequantize(torch.float16)))
    return out


def merged_weights(base: dict[str, torch.Tensor], tensors: dict,
                   math: DeviceMath | None = None) -> dict[str, torch.Tensor]:
    """swap mode: the full fine-tuned weights W_base + Δ (every parameter, as a swap copies all of them)."""
    merged = dict(base)
    for name, delta in tensors.items():
        w = base.get(name)
        if w is None:
            continue  # e.g. lm_head of a tied model: it is the embedding parameter

        def merge(dev: torch.device, w=w, delta=delta) -> torch.Tensor:
            return (w.to(dev, non_blocking=True).float() + delta.to(dev).dequantize(torch.float32)).to(w.dtype)

        merged[name] = _compute(math, merge)
    return merged


def host_transform(mode: WorkerMode, base_host: dict[str, torch.Tensor] | None,
                   device: torch.device | str | None = None) -> HostTransform:
    """What a delta artifact becomes in the host tier under `mode`; its arithmetic on `device` if that is CUDA."""
    device = torch.device(device) if device is not None else None
    math = DeviceMath(device) if device is not None and device.type == "cuda" else None
    if mode.name == "dense-delta":
        return lambda tensors: dense_fp16(tensors, math)
    if mode.name == "swap":
        assert base_host is not None, "swap mode needs the base's host weights"
        return lambda tensors: merged_weights(base_host, tensors, math)
    return lambda tensors: tensors


def host_estimate(mode: WorkerMode, base_host: dict[str, torch.Tensor] | None) -> HostEstimate:
    """Bytes a delta will hold in the host tier under `mode`, known before it is loaded (the host budget's admission
    check): swap holds a whole merged model, dense-delta every delta tensor in fp16, delta the packed bytes."""
    if mode.name == "swap":
        assert base_host is not None, "swap mode needs the base's host weights"
        merged = sum(t.numel() * t.element_size() for t in base_host.values())
        return lambda path, disk_bytes: merged
    if mode.name == "dense-delta":
        from deltazip.artifact.errors import ArtifactError
        from deltazip.artifact.manifest import read_manifest

        def dense(path: str, disk_bytes: int) -> int:
            try:
                return sum(2 * prod(t.shape) for t in read_manifest(path).tensors.values())  # all as fp16
            except (ArtifactError, OSError):
                return disk_bytes  # unreadable here: load_host reports the error; its true size is counted after

        return dense
    return lambda path, disk_bytes: disk_bytes
