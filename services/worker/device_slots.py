"""DeviceSlots: the tensors of the deltas that sit in device slots, laid out for the step's DeltaOps.

The ResidencyManager decides which delta goes to which slot; this holds the bytes. Linear deltas stay
packed (the SBMM kernel dequantizes on the fly); norm and embedding deltas are kept dense in the
model dtype because they are applied per row by indexing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(slots=True)
class SlotContents:
    """One slot: linear deltas by HF tensor name (packed), plus dense norm/embedding deltas."""

    name: str
    linears: dict[str, object] = field(default_factory=dict)  # tensor name -> DeltaTensor on device
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> [H] or [V, H] in model dtype
    nbytes: int = 0
    dequantized: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict)  # reference path cache


class DeviceSlots:
    """`num_slots` slots on `device`; written by the residency loader, read by each step's DeltaOps."""

    def __init__(self, num_slots: int, device: torch.device | str, dtype: torch.dtype, linear_names: set[str],
                 tie_word_embeddings: bool) -> None:
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.dtype = dtype
        self._linear_names = linear_names  # HF tensor names of the model's linear weights
        self._tied = tie_word_embeddings
        self._slots: list[SlotContents | None] = [None] * num_slots
        self._lock = threading.Lock()
        self.version = 0  # bumped on every write/drop: cached kernel stacks rebuild when it moves

    def write(self, slot: int, name: str, tensors: dict) -> int:
        """Copy one delta's tensors ({HF tensor name: DeltaTensor}, any device) into `slot`; returns bytes."""
        contents = SlotContents(name)
        for tensor_name, delta in tensors.items():
            if tensor_name in self._linear_names:
                moved = delta.to(self.device)
                contents.linears[tensor_name] = moved
                contents.nbytes += moved.nbytes
            else:
                dense = delta.dequantize(self.dtype).to(self.device)
                contents.dense[tensor_name] = dense
                contents.nbytes += dense.numel() * dense.element_size()
        if self._tied and EMBED in contents.dense and LM_HEAD not in contents.linears:
            contents.linears[LM_HEAD] = _DenseView(contents.dense[EMBED])  # tied: lm_head delta = embed delta
        with self._lock:
            self._slots[slot] = contents
            self.version += 1
        return contents.nbytes

    def drop(self, slot: int) -> None:
        with self._lock:
            self._slots[slot] = None
            self.version += 1

    def contents(self, slot: int) -> SlotContents:
        contents = self._slots[slot]
        assert contents is not None, f"slot {slot} is empty"
        return contents

    def linear(self, slot: int, tensor_name: str):
        """The packed (or dense-view) delta of one linear in `slot`, or None when unchanged."""
        return self.contents(slot).linears.get(tensor_name)

    def linear_dense(self, slot: int, tensor_name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Reference path: the dequantized [N, K] delta of one linear, cached per slot write."""
        contents = self.contents(slot)
        key = (tensor_name, dtype)
        cached = contents.dequantized.get(key)
        if cached is None:
            delta = contents.linears.get(tensor_name)
            if delta is None:
                return None
            cached = contents.dequantized[key] = delta.dequantize(dtype)
        return cached

    def dense(self, slot: int, tensor_name: str) -> torch.Tensor | None:
        return self.contents(slot).dense.get(tensor_name)


@dataclass(slots=True)
class _DenseView:
    """A dense [N, K] delta seen through the DeltaTensor interface (tied lm_head)."""

    delta: torch.Tensor
    kind: str = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    @property
    def nbytes(self) -> int:
        return 0  # shares the embedding delta's storage

    def dequantize(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return self.delta.to(dtype)
