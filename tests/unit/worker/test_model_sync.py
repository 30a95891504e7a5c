"""ModelSync: deleted or overwritten deltas are evicted from every tier, pinned ones only after they drain."""

import asyncio

from deltazip.cluster.models import ModelRecord
from services.worker.model_sync import ModelSync
from services.worker.residency import DeltaState, ResidentDelta, Tier


class FakeRegistry:
    def __init__(self, records: list[ModelRecord]):
        self.records = records

    async def list(self) -> list[ModelRecord]:
        return list(self.records)


class FakeResidency:
    """Holds deltas on disk; `pinned` ones refuse eviction, as the real manager does."""

    def __init__(self, names: list[str]):
        self.held = set(names)
        self.pinned: set[str] = set()
        self.evictions: list[tuple[str, Tier]] = []

    def snapshot(self) -> list[ResidentDelta]:
        return [ResidentDelta(n, DeltaState.ON_DISK, Tier.DISK, 10, None, int(n in self.pinned)) for n in sorted(self.held)]

    def evict(self, name: str, tier: Tier) -> bool:
        if name in self.pinned:
            return False
        self.held.discard(name)
        self.evictions.append((name, tier))
        return True


def test_deleted_delta_is_evicted_after_its_requests_drain():
    registry = FakeRegistry([ModelRecord("a", created_unix_ms=1), ModelRecord("b", created_unix_ms=1)])
    residency = FakeResidency(["a", "b"])
    sync = ModelSync(registry, residency)
    assert asyncio.run(sync.sync_once()) == []
    registry.records = [ModelRecord("b", created_unix_ms=1)]  # "a" deleted while a request still uses it
    residency.pinned = {"a"}
    assert asyncio.run(sync.sync_once()) == []
    residency.pinned = set()  # the request finished
    assert asyncio.run(sync.sync_once()) == ["a"]
    assert residency.evictions == [("a", Tier.DISK)]


def test_overwritten_delta_is_evicted_and_the_new_version_kept():
    registry = FakeRegistry([ModelRecord("a", created_unix_ms=1, artifact_bytes=5)])
    residency = FakeResidency(["a"])
    sync = ModelSync(registry, residency)
    assert asyncio.run(sync.sync_once()) == []
    registry.records = [ModelRecord("a", created_unix_ms=2, artifact_bytes=5)]  # pushed again with --overwrite
    assert asyncio.run(sync.sync_once()) == ["a"]
    residency.held.add("a")  # the new version fetched by the next request
    assert asyncio.run(sync.sync_once()) == []


def test_copy_fetched_between_checks_of_a_changed_entry_is_dropped():
    registry = FakeRegistry([ModelRecord("a", created_unix_ms=1)])
    residency = FakeResidency(["a"])
    sync = ModelSync(registry, residency)
    assert asyncio.run(sync.sync_once()) == []
    registry.records = []  # deleted
    assert asyncio.run(sync.sync_once()) == ["a"]
    registry.records = [ModelRecord("a", created_unix_ms=3)]  # pushed again, fetched, maybe overwritten: all before a check
    residency.held.add("a")
    assert asyncio.run(sync.sync_once()) == ["a"]  # which version is held is unknown: refetch
    residency.held.add("a")
    assert asyncio.run(sync.sync_once()) == []  # stable entry: the copy is kept


def test_a_new_name_fetched_before_the_first_check_is_kept():
    registry = FakeRegistry([])
    residency = FakeResidency([])
    sync = ModelSync(registry, residency)
    assert asyncio.run(sync.sync_once()) == []
    registry.records = [ModelRecord("new", created_unix_ms=1)]
    residency.held.add("new")
    assert asyncio.run(sync.sync_once()) == []
