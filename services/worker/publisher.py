"""Publisher: mirrors this worker into Redis — heartbeat (TTL) with address and load, residency per tier.

Residency transitions arrive from any thread (`on_residency_change`) and are written in order by one
asyncio task; every heartbeat also rewrites the full residency snapshot, so a missed event heals.
The live delta-store addresses are read back on each beat for the fetcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from deltazip.cluster.heartbeat import heartbeat_loop
from deltazip.cluster.models import ModelRegistry
from deltazip.cluster.stores import StoreRegistry
from deltazip.cluster.workers import Tier as ClusterTier
from deltazip.cluster.workers import WorkerRecord, WorkerRegistry
from deltazip.logs import get_logger
from services.worker.residency import DeltaState, ResidentDelta, Tier

log = get_logger("services.worker.publisher")

# Tiers are inclusive: a delta on device is also in host and on disk.
_CLUSTER_TIERS_OF_STATE = {
    DeltaState.ON_DEVICE: (ClusterTier.DEVICE, ClusterTier.HOST, ClusterTier.DISK),
    DeltaState.LOADING: (ClusterTier.HOST, ClusterTier.DISK),
    DeltaState.IN_HOST: (ClusterTier.HOST, ClusterTier.DISK),
    DeltaState.ON_DISK: (ClusterTier.DISK,),
    DeltaState.FETCHING: (),
    DeltaState.REMOTE: (),
    DeltaState.FAILED: (),
}


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    num_running: int
    num_waiting: int
    queued_tokens: int
    free_kv_blocks: int
    total_kv_blocks: int


class Publisher:
    """Owns this worker's keys in Redis; start with `run(stop)` in the server's event loop."""

    def __init__(self, redis, record: WorkerRecord, load: Callable[[], WorkerLoad],
                 residency: Callable[[], dict[ClusterTier, list[str]]], ttl_s: float, interval_s: float) -> None:
        self._workers = WorkerRegistry(redis, ttl_s=ttl_s)
        self._stores = StoreRegistry(redis)
        self._models = ModelRegistry(redis)
        self._record = record
        self._load = load
        self._residency = residency
        self._interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[ResidentDelta] = asyncio.Queue()
        self.store_addresses: list[str] = []
        self.on_stores: Callable[[list[str]], None] = lambda addresses: None

    def on_residency_change(self, snap: ResidentDelta) -> None:
        """Thread-safe: queue one transition for Redis (called under the residency lock, so cheap)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._events.put_nowait, snap)

    async def start(self) -> None:
        """Publish the base, the first heartbeat and the live stores."""
        self._loop = asyncio.get_running_loop()
        await self.beat()

    async def beat(self) -> None:
        # every beat, not once: a Redis that restarted without its data learns the base again
        await self._models.set_base(self._record.base, self._record.base_identity)
        load = self._load()
        record = WorkerRecord(**{**_fields(self._record), "num_running": load.num_running,
                                 "num_waiting": load.num_waiting, "queued_tokens": load.queued_tokens,
                                 "free_kv_blocks": load.free_kv_blocks, "total_kv_blocks": load.total_kv_blocks})
        await self._workers.heartbeat(record, residency=self._residency())
        self.store_addresses = [s.address for s in await self._stores.live()]
        self.on_stores(self.store_addresses)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat every interval and drain residency events until `stop`."""
        drain = asyncio.create_task(self._drain(stop))
        try:
            await heartbeat_loop(self.beat, self._interval_s, stop)
        finally:
            drain.cancel()

    async def close(self) -> None:
        """Remove this worker from Redis (graceful stop)."""
        try:
            await self._workers.unregister(self._record.worker_id)
        except (RedisError, OSError) as exc:
            log.warning("unregister_failed", error=str(exc))

    async def _drain(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            snap = await self._events.get()
            try:
                await self._publish(snap)
            except (RedisError, OSError) as exc:
                log.warning("residency_publish_failed", model=snap.name, error=str(exc))

    async def _publish(self, snap: ResidentDelta) -> None:
        wid = self._record.worker_id
        present = _CLUSTER_TIERS_OF_STATE[snap.state]
        if snap.state in (DeltaState.FETCHING, DeltaState.LOADING):
            return  # in flight: the nearest complete tier is unchanged
        for tier in ClusterTier:
            if tier in present:
                await self._workers.set_resident(wid, snap.name, tier)
            else:
                await self._workers.remove_resident(wid, snap.name, tier)
        log.debug("residency_published", model=snap.name, state=snap.state.value)


def _fields(record: WorkerRecord) -> dict:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}



def cluster_residency(lru_names: Callable[[Tier], list[str]]) -> dict[ClusterTier, list[str]]:
    """Residency per cluster tier in LRU order, from ResidencyManager.lru_names."""
    tiers = {ClusterTier.DEVICE: Tier.DEVICE, ClusterTier.HOST: Tier.HOST, ClusterTier.DISK: Tier.DISK}
    return {ct: lru_names(t) for ct, t in tiers.items()}
