"""ArtifactTierIO: the slow moves between residency tiers for real artifacts (fetch, load, copy, drop)."""

from __future__ import annotations

import shutil

import torch

from services.worker.device_slots import DeviceSlots
from services.worker.fetcher import DeltaFetcher


class ArtifactTierIO:
    """TierIO over the disk cache (fetcher), host memory (load_delta on CPU) and DeviceSlots."""

    def __init__(self, fetcher: DeltaFetcher, slots: DeviceSlots) -> None:
        self._fetcher = fetcher
        self._slots = slots
        self._pin = slots.device.type == "cuda"  # pinned host copies make host→device copies fast

    def fetch(self, name: str) -> tuple[str, int]:
        return self._fetcher.fetch(name)

    def load_host(self, name: str, path: str) -> tuple[dict, int]:
        from deltazip.artifact import load_delta

        tensors = load_delta(path, "cpu")  # every shard is checked against its sha256 as it is read
        if self._pin:
            tensors = {k: _pinned(v) for k, v in tensors.items()}
        return tensors, sum(t.nbytes for t in tensors.values())

    def to_device(self, name: str, host: dict, slot: int) -> int:
        return self._slots.write(slot, name, host)

    def drop_device(self, name: str, slot: int) -> None:
        self._slots.drop(slot)

    def drop_disk(self, name: str, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


def _pinned(delta):
    parts = ("qweight", "meta", "scales", "zeros", "delta")
    for part in parts:
        t = getattr(delta, part)
        if isinstance(t, torch.Tensor):
            setattr(delta, part, t.pin_memory())
    return delta
