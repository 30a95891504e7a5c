"""ArtifactTierIO: the slow moves between residency tiers for real artifacts (fetch, load, copy, drop)."""

from __future__ import annotations

import shutil

import torch

from deltazip.artifact.delta_tensor import PARTS, cpu_parts as _parts  # _parts: a host-tier entry's CPU tensors
from deltazip.artifact.reader import ReadBuffers
from deltazip.logs import get_logger
from services.worker.device_slots import DeviceSlots
from services.worker.fetcher import DeltaFetcher
from services.worker.modes import HostEstimate, HostTransform

log = get_logger("services.worker.tier_io")


class ArtifactTierIO:
    """TierIO over the disk cache (fetcher), host memory (load_delta on CPU) and DeviceSlots."""

    def __init__(self, fetcher: DeltaFetcher, slots: DeviceSlots, host_transform: HostTransform | None = None,
                 device_slots_used: bool = True, host_estimate: HostEstimate | None = None,
                 trust_stamps: bool = False, reuse_buffers: bool = True) -> None:
        self._fetcher = fetcher
        self._slots = slots
        self._transform = host_transform or (lambda tensors: tensors)  # per mode: packed, dense fp16, merged
        self._estimate = host_estimate or (lambda path, disk_bytes: disk_bytes)  # packed: as on disk
        self._device_slots_used = device_slots_used  # swap mode: the engine copies whole weights itself
        self._pin = slots.device.type == "cuda"  # pinned host copies make host→device copies fast
        # shards the fetcher hashed on download are not hashed again while unchanged on disk (--reverify-disk-cache)
        self._trust_stamps = trust_stamps
        # a pinning tier copies every tensor out of the shard buffers: they are read into reused ones (one kept
        # between loads, up to 2 GiB: the default shard size; reuse_buffers=False: new ones, bench/load_delta.py)
        self._buffers = ReadBuffers() if self._pin and reuse_buffers else None

    def fetch(self, name: str) -> tuple[str, int]:
        return self._fetcher.fetch(name)

    def load_host(self, name: str, path: str) -> tuple[dict, int]:
        if not self._pin:
            tensors = _compacted(self._read(name, path, None))
        elif self._buffers is None:
            tensors = {k: _pinned(v) for k, v in self._read(name, path, None).items()}  # copies
        else:
            with self._buffers.lease() as lease:
                tensors = {k: _pinned(v) for k, v in self._read(name, path, lease.take).items()}  # copies
                lease.done(tensors.values())
        return tensors, sum(_nbytes(t) for t in tensors.values())

    def _read(self, name: str, path: str, buffer) -> dict:
        """The delta's host form (the mode's transform of its tensors) from its disk copy, fetched anew once when
        that copy is bad."""
        from deltazip.artifact import load_delta
        from deltazip.artifact.errors import ArtifactError, BaseMismatchError

        try:
            # shards checked against their sha256 as read, or against the fetcher's stamp while unchanged on disk
            tensors = load_delta(path, "cpu", trust_stamp=self._trust_stamps, buffer=buffer)
        except ArtifactError as exc:
            if isinstance(exc, BaseMismatchError):
                raise
            # The disk copy went bad after it was fetched and verified (disk error, someone edited it):
            # never serve it; fetch a fresh copy once, and fail the request if that one is bad too.
            log.warning("disk_copy_corrupt", model=name, error=str(exc))
            shutil.rmtree(path, ignore_errors=True)
            path, _ = self._fetcher.fetch(name)
            tensors = load_delta(path, "cpu", trust_stamp=False, buffer=buffer)
        return self._transform(tensors)

    def host_bytes_estimate(self, name: str, path: str, disk_bytes: int) -> int:
        return self._estimate(path, disk_bytes)

    def to_device(self, name: str, host: dict, slot: int) -> int:
        if not self._device_slots_used:
            return 0  # swap: "on device" = may be swapped in; the copy happens when the engine swaps
        return self._slots.write(slot, name, host)

    def drop_device(self, name: str, slot: int) -> None:
        if self._device_slots_used:
            self._slots.drop(slot)

    def drop_disk(self, name: str, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes


def _compacted(tensors: dict) -> dict:
    """`tensors` with their parts copied out of the shard buffers they view (deltazip/artifact/reader.py) where a
    buffer holds more than its kept parts and the shard's header: a mode that keeps a few of a shard's tensors
    (dense-delta keeps the fp16 norms and embeddings, and expands the packed ones into new tensors) would otherwise
    keep whole shards alive, uncounted by the host budget. A delta kept whole (delta mode) keeps its shards as
    read, no copy."""
    from deltazip.artifact.reader import compact

    kept: dict[int, int] = {}  # storage -> bytes of the parts viewing it
    held: dict[int, int] = {}  # storage -> its bytes
    for delta in tensors.values():
        for t in _parts(delta):
            key = t.untyped_storage().data_ptr()
            kept[key] = kept.get(key, 0) + t.numel() * t.element_size()
            held[key] = t.untyped_storage().nbytes()
    # storages holding more than their kept parts, a shard's header and alignment
    loose = {key for key, num_bytes in held.items() if num_bytes - kept[key] > 16 * 1024 + num_bytes // 100}
    if not loose:
        return tensors
    return {name: compact(delta) if any(t.untyped_storage().data_ptr() in loose for t in _parts(delta)) else delta
            for name, delta in tensors.items()}


def _pinned(delta):
    if isinstance(delta, torch.Tensor):
        return delta.pin_memory()
    for part in PARTS:
        t = getattr(delta, part, None)
        if isinstance(t, torch.Tensor):
            setattr(delta, part, t.pin_memory())
    return delta
