"""Worker registry: live workers (hash + heartbeat TTL), their load, and their resident deltas per tier (LRU)."""

from dataclasses import dataclass, replace
from enum import Enum

import redis.asyncio as aioredis

from deltazip.cluster import keys
from deltazip.cluster.connection import now_ms
from deltazip.cluster.records import from_hash, to_hash


# Admission: a queue place on the worker is a zset member (request id) scored by its lease expiry; expired
# leases (a scheduler that died mid-request) are dropped first, so a crash never leaks capacity.
_ADMIT = """
local key = KEYS[1]
local now, limit, member, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if limit > 0 and n >= limit and not redis.call('ZSCORE', key, member) then return -1 end
redis.call('ZADD', key, expiry, member)
redis.call('EXPIRE', key, ARGV[5])
return n + 1
"""


class Tier(Enum):
    """Where a delta lives on a worker; the nearer tiers are subsets of the farther ones."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One worker as published in `dz:worker:<id>` on every heartbeat."""

    worker_id: str
    address: str
    base: str = ""
    base_identity: str = ""
    device: str = ""
    mode: str = ""
    num_device_slots: int = 0  # 0 = unknown (schedulers then never evict for a prefetch)
    num_running: int = 0
    num_waiting: int = 0
    queued_tokens: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    started_ms: int = 0
    heartbeat_ms: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Live workers as read in one round trip (`WorkerRegistry.snapshot`)."""

    records: list["WorkerRecord"]  # alive, in the order asked
    nearest: dict[str, dict[str, "Tier | None"]]  # model -> worker id -> nearest tier holding it (None = store)
    inflight: dict[str, int]  # worker id -> requests all schedulers relay to it now
    dead: list[str]  # asked for but gone (pruned from the index)


class WorkerRegistry:
    """The worker publishes itself here; schedulers read live workers, residency and in-flight counts."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float = 10.0):
        assert ttl_s > 0
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self._admit = redis.register_script(_ADMIT)

    # -- written by the worker -------------------------------------------------------------------------------
    async def heartbeat(self, record: WorkerRecord, residency: dict[Tier, list[str]] | None = None) -> None:
        """Publish load (and optionally a full residency snapshot, each list in LRU order) and refresh TTLs."""
        record = replace(record, heartbeat_ms=now_ms())
        wid = record.worker_id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.worker(wid), mapping=to_hash(record))
            pipe.pexpire(keys.worker(wid), self.ttl_ms)
            pipe.sadd(keys.workers(), wid)
            for tier in Tier:
                key = keys.worker_resident(wid, tier.value)
                if residency is not None:
                    pipe.delete(key)
                    models = residency.get(tier, [])
                    if models:  # scores keep the given LRU order
                        pipe.zadd(key, {m: record.heartbeat_ms - len(models) + i for i, m in enumerate(models)})
                pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def set_resident(self, worker_id: str, model: str, tier: Tier) -> None:
        """Mark `model` as (most recently) used in `tier` on this worker."""
        key = keys.worker_resident(worker_id, tier.value)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {model: now_ms()})
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def remove_resident(self, worker_id: str, model: str, tier: Tier) -> None:
        """`model` left `tier` on this worker (evicted)."""
        await self.redis.zrem(keys.worker_resident(worker_id, tier.value), model)

    async def unregister(self, worker_id: str) -> None:
        """Remove the worker and its residency at shutdown."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.worker(worker_id), *(keys.worker_resident(worker_id, t.value) for t in Tier))
            pipe.srem(keys.workers(), worker_id)
            await pipe.execute()

    # -- read by schedulers ----------------------------------------------------------------------------------
    async def ids(self) -> list[str]:
        """Ids in the index (some may have died: `snapshot` tells and prunes them), sorted."""
        return sorted(await self.redis.smembers(keys.workers()))

    async def snapshot(self, worker_ids: list[str], models: list[str],
                       known: dict[str, "WorkerRecord"] | None = None) -> "ClusterSnapshot":
        """In one round trip: the records of those of `worker_ids` still alive, the nearest tier holding each of
        `models` on each, and each one's in-flight count (`inflight`). Dead ids are pruned from the index.

        `known`: records read a moment ago; for those ids only liveness is read (EXISTS, not the record's hash,
        whose fields change once per heartbeat), and the known record is returned while the worker lives."""
        tiers = list(Tier)
        now = now_ms()
        known = known or {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid in worker_ids:
                if wid in known:
                    pipe.exists(keys.worker(wid))
                else:
                    pipe.hgetall(keys.worker(wid))
                pipe.zcount(keys.worker_inflight(wid), now, "+inf")
                for model in models:
                    for tier in tiers:
                        pipe.zscore(keys.worker_resident(wid, tier.value), model)
            rows = await pipe.execute()
        width = 2 + len(models) * len(tiers)
        records, inflight, nearest, dead = [], {}, {m: {} for m in models}, []
        for i, wid in enumerate(worker_ids):
            row = rows[i * width : (i + 1) * width]
            if not row[0]:
                dead.append(wid)
                continue
            records.append(known[wid] if wid in known else from_hash(WorkerRecord, row[0]))
            inflight[wid] = int(row[1])
            for j, model in enumerate(models):
                scores = row[2 + j * len(tiers) : 2 + (j + 1) * len(tiers)]
                nearest[model][wid] = next((t for t, sc in zip(tiers, scores) if sc is not None), None)
        if dead:
            await self.redis.srem(keys.workers(), *dead)
        return ClusterSnapshot(records, nearest, inflight, dead)

    async def get(self, worker_id: str) -> WorkerRecord | None:
        """The worker's record, or None if it is not alive."""
        row = await self.redis.hgetall(keys.worker(worker_id))
        return from_hash(WorkerRecord, row) if row else None

    async def residency(self, worker_id: str) -> dict[Tier, list[str]]:
        """Resident models per tier, least recently used first."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tier in Tier:
                pipe.zrange(keys.worker_resident(worker_id, tier.value), 0, -1)
            rows = await pipe.execute()
        return {tier: list(row) for tier, row in zip(Tier, rows)}

    # -- in-flight leases kept by schedulers -----------------------------------------------------------------
    async def admit(self, worker_id: str, request_id: str, limit: int, lease_s: float) -> bool:
        """Atomically take a queue place on the worker unless it holds `limit` live leases (0 = unbounded)."""
        now = now_ms()
        taken = await self._admit(keys=[keys.worker_inflight(worker_id)],
                                  args=[now, limit, request_id, now + int(lease_s * 1000), keys.INFLIGHT_TTL_S])
        return int(taken) > 0

    async def renew_many(self, worker_id: str, request_ids: list[str], lease_s: float) -> None:
        """Extend the leases of requests still relayed to the worker (XX: never resurrect a released one), one
        command."""
        if request_ids:
            expiry = now_ms() + int(lease_s * 1000)
            await self.redis.zadd(keys.worker_inflight(worker_id), dict.fromkeys(request_ids, expiry), xx=True)

    async def release(self, worker_id: str, request_id: str) -> None:
        """The request left the worker (finished, failed or cancelled)."""
        await self.redis.zrem(keys.worker_inflight(worker_id), request_id)

    @staticmethod
    def queue_release(pipe, worker_id: str, request_id: str) -> None:
        """`release`'s command, added to a pipeline the caller executes."""
        pipe.zrem(keys.worker_inflight(worker_id), request_id)

    async def alive(self, worker_id: str) -> bool:
        """True while the worker's heartbeat key exists."""
        return bool(await self.redis.exists(keys.worker(worker_id)))
