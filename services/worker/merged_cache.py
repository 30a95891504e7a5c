"""MergedCache: base + Δ weights of the fine-tunes with the most prompt work, kept on the GPU between steps.

The dense route (kernels/delta_linear.py `merged_linear`) expands base + Δ for every linear of every step that has
a long segment, then runs one GEMM. Under a Zipf popularity most prompt rows belong to a few fine-tunes, and their
segments come back step after step (docs/serving.md, session 28: 41% of prefill delta rows in segments of 256+
rows). This cache keeps those expansions: a slot is admitted by a segment of `admit_rows` rows (where one expansion
already costs less than SBMM on it), and once admitted its segments of `use_rows` rows or more run one GEMM on the
kept weights, with no expansion and no SBMM launch. Decode steps (a few rows a fine-tune, CUDA graphs) keep SBMM.

Entries are per slot and per linear (HF tensor name of the linear or fused group), tagged with the slot's write
generation (`DeviceSlots.generation`): a slot rewritten with another delta never serves a stale weight, and its old
entry is freed when the budget needs room. Whole slots are evicted, least recently used first. The engine thread
alone touches the cache; `DeviceSlots.write` only bumps the generation.

Measured (H200, 16 layers, 2-bit, docs/serving.md session 30): 0.79x the default's prefill step time in
bench/worker.py's prefill-route-ab (32 fine-tunes, at most 4 a step), but in serving (up to 16 fine-tunes a step)
its prefill steps were 1.09-1.20x slower and TTFT p90 2.27x / 7.78x the base at loads 0.5 / 1 against the default's
2.10x / 2.97x, so it is off unless asked for (--merged-cache-bytes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from deltazip.logs import get_logger

log = get_logger(__name__)

USE_ROWS = 64  # a kept slot's segments of this many rows run on its merged weights (a GEMM's weight read ~ SBMM's)


@dataclass
class _SlotEntry:
    generation: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    num_bytes: int = 0


class MergedCache:
    """Merged (base + Δ) weights by slot, within `budget_bytes` of device memory."""

    def __init__(self, budget_bytes: int, admit_rows: int = 256, use_rows: int = USE_ROWS) -> None:
        if budget_bytes <= 0 or admit_rows <= 0 or use_rows <= 0:
            raise ValueError(f"MergedCache: budget_bytes, admit_rows and use_rows must be positive, got "
                             f"{budget_bytes}, {admit_rows}, {use_rows}")
        self.budget_bytes = budget_bytes
        self.admit_rows = admit_rows
        self.use_rows = use_rows
        self._slots: OrderedDict[int, _SlotEntry] = OrderedDict()  # least recently used first
        self.used_bytes = 0
        self.hits = 0
        self.builds = 0
        self.evictions = 0

    def wants(self, slot: int, generation: int, rows: int) -> bool:
        """Whether a segment of `rows` rows on `slot` should run on merged weights from this cache: it admits the
        slot (`admit_rows`), or the slot is kept for this generation and the segment has `use_rows` rows."""
        if rows >= self.admit_rows:
            return True
        entry = self._slots.get(slot)
        return entry is not None and entry.generation == generation and rows >= self.use_rows

    def lookup(self, slot: int, generation: int, name: str) -> torch.Tensor | None:
        """The kept weight of linear `name` on `slot` at this generation (the slot becomes most recently used), or
        None."""
        entry = self._slots.get(slot)
        if entry is None or entry.generation != generation:
            return None
        weight = entry.weights.get(name)
        if weight is not None:
            self._slots.move_to_end(slot)
            self.hits += 1
        return weight

    def reserve(self, slot: int, generation: int, num_bytes: int, protect: frozenset[int] = frozenset()) -> bool:
        """Make room for `num_bytes` more on `slot` at this generation: this slot's entry of an older generation
        goes first, then other slots not in `protect` (the current step's: two fine-tunes of one step must not
        evict each other linear by linear), least recently used first; this slot's current entries stay. False when
        even then it would not fit (no other slot is evicted then)."""
        entry = self._slots.get(slot)
        if entry is not None and entry.generation != generation:
            self._evict(slot)
        evictable = [s for s in self._slots if s != slot and s not in protect]
        free = self.budget_bytes - self.used_bytes + sum(self._slots[s].num_bytes for s in evictable)
        if num_bytes > free:
            return False
        for other in evictable:
            if self.used_bytes + num_bytes <= self.budget_bytes:
                break
            self._evict(other)
        return True

    def put(self, slot: int, generation: int, name: str, weight: torch.Tensor) -> None:
        """Keep `weight` for linear `name` on `slot` (after a `reserve` of its bytes)."""
        entry = self._slots.get(slot)
        if entry is None or entry.generation != generation:
            if entry is not None:
                self._evict(slot)
            entry = self._slots[slot] = _SlotEntry(generation)
            log.info("merged_cache_admit", slot=slot, generation=generation, used_bytes=self.used_bytes)
        old = entry.weights.pop(name, None)
        if old is not None:
            entry.num_bytes -= _nbytes(old)
            self.used_bytes -= _nbytes(old)
        entry.weights[name] = weight
        entry.num_bytes += _nbytes(weight)
        self.used_bytes += _nbytes(weight)
        self._slots.move_to_end(slot)
        self.builds += 1

    def shrink_to_used(self) -> None:
        """Make the budget what is kept now (an expansion ran out of device memory: the GPU cannot hold more)."""
        log.warning("merged_cache_out_of_memory", budget_bytes=self.budget_bytes, used_bytes=self.used_bytes)
        self.budget_bytes = self.used_bytes

    def kept_slots(self) -> list[int]:
        """Slots with kept weights, least recently used first."""
        return list(self._slots)

    def stats(self) -> dict:
        return {"slots": len(self._slots), "used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "builds": self.builds, "evictions": self.evictions}

    def _evict(self, slot: int) -> None:
        entry = self._slots.pop(slot)
        self.used_bytes -= entry.num_bytes
        self.evictions += 1
        log.info("merged_cache_evict", slot=slot, generation=entry.generation, freed_bytes=entry.num_bytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
