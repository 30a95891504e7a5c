"""Residency vocabulary: delta states (the values Redis mirrors), tiers, per-delta entries and snapshots."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class DeltaState(enum.Enum):
    REMOTE = "remote"
    FETCHING = "fetching"
    ON_DISK = "on_disk"
    IN_HOST = "in_host"
    LOADING = "loading"
    ON_DEVICE = "on_device"
    FAILED = "failed"


class Tier(enum.IntEnum):
    """Ordered from fastest; values match deltazip.v1.ResidencyTier."""

    DEVICE = 1
    HOST = 2
    DISK = 3
    REMOTE = 4


TIER_OF_STATE = {
    DeltaState.ON_DEVICE: Tier.DEVICE,
    DeltaState.LOADING: Tier.HOST,
    DeltaState.IN_HOST: Tier.HOST,
    DeltaState.ON_DISK: Tier.DISK,
    DeltaState.FETCHING: Tier.REMOTE,
    DeltaState.REMOTE: Tier.REMOTE,
    DeltaState.FAILED: Tier.REMOTE,
}


class TierIO(Protocol):
    """The slow moves between tiers; ResidencyManager decides when, this does the work."""

    def fetch(self, name: str) -> tuple[str, int]: ...  # -> (disk dir, bytes on disk)

    def load_host(self, name: str, path: str) -> tuple[Any, int]: ...  # -> (host object, bytes)

    def host_bytes_estimate(self, name: str, path: str, disk_bytes: int) -> int: ...  # what load_host will hold

    def to_device(self, name: str, host: Any, slot: int) -> int: ...  # -> device bytes

    def drop_device(self, name: str, slot: int) -> None: ...

    def drop_disk(self, name: str, path: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ResidencyLimits:
    num_device_slots: int
    device_bytes: int  # 0 = slots only
    host_bytes: int
    disk_bytes: int


@dataclass(slots=True)
class DeltaEntry:
    name: str
    state: DeltaState = DeltaState.REMOTE
    path: str = ""
    host: Any = None
    slot: int | None = None
    disk_bytes: int = 0
    host_bytes: int = 0
    device_bytes: int = 0
    pins: int = 0
    busy: bool = False  # a fetch/load/copy is running for it
    draining_since: int | None = None  # engine step when it stopped taking new sequences to free its slot
    error: BaseException | None = None
    load_ms: float = 0.0

    @property
    def tier(self) -> Tier:
        return TIER_OF_STATE[self.state]


@dataclass(frozen=True, slots=True)
class ResidentDelta:
    name: str
    state: DeltaState
    tier: Tier
    bytes: int
    slot: int | None
    pins: int


ChangeCallback = Callable[[ResidentDelta], None]


def snapshot_of(entry: DeltaEntry) -> ResidentDelta:
    num_bytes = {Tier.DEVICE: entry.device_bytes, Tier.HOST: entry.host_bytes, Tier.DISK: entry.disk_bytes}
    return ResidentDelta(entry.name, entry.state, entry.tier, num_bytes.get(entry.tier, 0), entry.slot, entry.pins)
