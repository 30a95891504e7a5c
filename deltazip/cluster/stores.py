"""Store registry: live delta-store replicas, each a hash with a heartbeat TTL."""

from dataclasses import dataclass, replace

import redis.asyncio as aioredis

from deltazip.cluster import keys
from deltazip.cluster.connection import now_ms
from deltazip.cluster.records import from_hash, to_hash


@dataclass(frozen=True, slots=True)
class StoreRecord:
    """One delta-store replica (`dz:store:<id>`)."""

    store_id: str
    address: str
    root: str = ""
    started_ms: int = 0
    heartbeat_ms: int = 0


class StoreRegistry:
    """Publishes a store's liveness and lists the live ones."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float = 10.0):
        assert ttl_s > 0
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)

    async def heartbeat(self, record: StoreRecord) -> None:
        """Write the store's hash and refresh its TTL; absent after `ttl_s` without a beat = dead."""
        record = replace(record, heartbeat_ms=now_ms())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.store(record.store_id), mapping=to_hash(record))
            pipe.pexpire(keys.store(record.store_id), self.ttl_ms)
            pipe.sadd(keys.stores(), record.store_id)
            await pipe.execute()

    async def unregister(self, store_id: str) -> None:
        """Remove the store at shutdown."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.store(store_id))
            pipe.srem(keys.stores(), store_id)
            await pipe.execute()

    async def live(self) -> list[StoreRecord]:
        """Stores whose heartbeat has not expired, sorted by id; prunes dead ids from the index."""
        ids = sorted(await self.redis.smembers(keys.stores()))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for store_id in ids:
                pipe.hgetall(keys.store(store_id))
            rows = await pipe.execute()
        dead = [store_id for store_id, row in zip(ids, rows) if not row]
        if dead:
            await self.redis.srem(keys.stores(), *dead)
        return [from_hash(StoreRecord, row) for row in rows if row]
