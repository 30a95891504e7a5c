"""Cluster state against a real redis-server: registry, liveness by TTL, residency LRU, queues, requests."""

import asyncio

import pytest

from deltazip.cluster import keys
from deltazip.cluster.connection import connect
from deltazip.cluster.models import ModelRecord, ModelRegistry
from deltazip.cluster.queues import QueueStats
from deltazip.cluster.requests import RequestLog, RequestState
from deltazip.cluster.stores import StoreRecord, StoreRegistry
from deltazip.cluster.workers import Tier, WorkerRecord, WorkerRegistry
from tests.integration.procs import redis_proc, redis_url  # noqa: F401  (fixtures)


def run(coro):
    return asyncio.run(coro)


def test_model_registry_roundtrip(redis_url):
    async def body():
        redis = connect(redis_url)
        registry = ModelRegistry(redis)
        record = ModelRecord("ft-a", base_identity="abc", artifact_bytes=123, compression_ratio=4.5, compression="4bit")
        await registry.register(record)
        await registry.register(ModelRecord("ft-b"))
        assert await registry.get("ft-a") == record
        assert [m.name for m in await registry.list()] == ["ft-a", "ft-b"]
        assert await registry.unregister("ft-a")
        assert not await registry.unregister("ft-a")
        assert await registry.get("ft-a") is None
        assert await registry.base() is None
        await registry.set_base("llama", "id1")
        assert (await registry.base()).name == "llama"
        assert all(k.startswith(keys.PREFIX) for k in await redis.keys("*"))
        await redis.aclose()

    run(body())


def test_worker_liveness_expires_and_residency_is_lru(redis_url):
    async def body():
        redis = connect(redis_url)
        workers = WorkerRegistry(redis, ttl_s=0.3)
        await workers.heartbeat(WorkerRecord("w1", "127.0.0.1:1", num_running=2),
                                {Tier.DEVICE: ["old", "new"], Tier.HOST: ["old", "new", "cold"]})
        await workers.heartbeat(WorkerRecord("w2", "127.0.0.1:2"))
        assert await workers.ids() == ["w1", "w2"]
        snap = await workers.snapshot(["w1", "w2"], [])
        assert [w.worker_id for w in snap.records] == ["w1", "w2"] and snap.records[0].num_running == 2
        assert (await workers.get("w1")).num_running == 2
        assert (await workers.residency("w1"))[Tier.DEVICE] == ["old", "new"]
        await workers.set_resident("w1", "old", Tier.DEVICE)  # used again: now most recent
        assert (await workers.residency("w1"))[Tier.DEVICE] == ["new", "old"]
        snap = await workers.snapshot(["w1", "w2"], ["cold", "new"])
        assert snap.nearest == {"cold": {"w1": Tier.HOST, "w2": None}, "new": {"w1": Tier.DEVICE, "w2": None}}
        assert await workers.admit("w2", "r1", limit=2, lease_s=60)
        assert await workers.admit("w2", "r2", limit=2, lease_s=60)
        assert not await workers.admit("w2", "r3", limit=2, lease_s=60)  # full
        assert await workers.admit("w2", "r2", limit=2, lease_s=60)  # a held place is renewed, not refused
        assert (await workers.snapshot(["w1", "w2"], [])).inflight == {"w1": 0, "w2": 2}
        await workers.release("w2", "r1")
        assert await workers.admit("w1", "gone", limit=1, lease_s=0.05)  # a lease nobody renews expires
        await asyncio.sleep(0.1)
        assert (await workers.snapshot(["w1", "w2"], [])).inflight == {"w1": 0, "w2": 1}
        assert await workers.admit("w1", "r4", limit=1, lease_s=60)
        await asyncio.sleep(0.2)
        await workers.heartbeat(WorkerRecord("w2", "127.0.0.1:2"))
        await asyncio.sleep(0.2)  # w1 missed its beat
        snap = await workers.snapshot(["w1", "w2"], ["new"])
        assert [w.worker_id for w in snap.records] == ["w2"] and snap.dead == ["w1"]
        assert await redis.smembers(keys.workers()) == {"w2"}  # the dead id was pruned from the index
        assert await workers.ids() == ["w2"]
        assert await workers.alive("w2") is True and await workers.alive("w1") is False
        await redis.aclose()

    run(body())


def test_store_registry_and_unregister(redis_url):
    async def body():
        redis = connect(redis_url)
        stores = StoreRegistry(redis, ttl_s=5)
        await stores.heartbeat(StoreRecord("s1", "127.0.0.1:9", root="/x"))
        live = await stores.live()
        assert [s.address for s in live] == ["127.0.0.1:9"] and live[0].heartbeat_ms > 0
        await stores.unregister("s1")
        assert await stores.live() == []
        await redis.aclose()

    run(body())


def test_queue_counts_and_rate(redis_url):
    async def body():
        redis = connect(redis_url)
        queues = QueueStats(redis, tau_s=10, lease_s=60)
        for i in range(5):
            state = await queues.arrive("m", f"r{i}")
        assert state.pending == 5 and state.rate_per_s == pytest.approx(0.5, rel=0.05)
        await queues.started("m", "r0")
        await queues.started("m", "r1")
        await queues.finished("m", "r1")
        await queues.finished("m", "r2")
        got = await queues.get("m")
        assert (got.pending, got.running) == (2, 1)
        for _ in range(3):  # ending twice is harmless
            await queues.finished("m", "r0")
        assert (await queues.get("m")).running == 0
        assert [q.model for q in await queues.active()] == ["m"]
        await redis.aclose()

    run(body())


def test_queue_entries_of_a_dead_scheduler_expire_with_their_lease(redis_url):
    async def body():
        redis = connect(redis_url)
        dying, alive = QueueStats(redis, lease_s=0.1), QueueStats(redis, lease_s=60)
        await dying.arrive("m", "orphan")  # its scheduler is killed: nobody renews or finishes it
        await alive.arrive("m", "kept")
        await asyncio.sleep(0.3)
        await alive.renew_many([("m", "kept")])
        assert (await alive.get("m")).pending == 1
        await redis.aclose()

    run(body())


def test_request_record_lifecycle(redis_url):
    async def body():
        redis = connect(redis_url)
        log = RequestLog(redis)
        await log.create("r1", "m")
        await log.routed("r1", "w1")
        await log.routed("r1", "w2")
        await log.set_state("r1", RequestState.FINISHED)
        record = await log.get("r1")
        assert (record.request_state, record.worker_id, record.attempts) == (RequestState.FINISHED, "w2", 2)
        assert 0 < await redis.ttl(keys.request("r1")) <= keys.REQUEST_TTL_S
        await redis.aclose()

    run(body())


def test_connection_pool_queues_commands_past_its_size(redis_url, monkeypatch):
    """Many more concurrent commands than pooled connections all succeed (they wait for a free connection) and
    the pool never opens more than its size: redis-py's plain pool failed them with "Too many connections" past
    100, which broke a scheduler with a thousand requests in flight and its workers' heartbeat checks."""
    import redis as sync_redis

    from deltazip.cluster.connection import max_connections_default

    async def body():
        r = connect(redis_url, max_connections=4)
        try:
            # BLPOP holds its connection for its whole timeout, so 4 at once fill the pool and the rest must wait
            results = await asyncio.gather(*[r.blpop([f"dz:test:empty:{i}"], timeout=0.05) for i in range(12)],
                                           *[r.incr("dz:test:n") for _ in range(300)])
            assert results[:12] == [None] * 12 and sorted(results[12:]) == list(range(1, 301))
            clients = sync_redis.Redis.from_url(redis_url).info("clients")["connected_clients"]
            assert clients <= 4 + 1, clients  # this pool's connections + the INFO one
        finally:
            await r.aclose()

    run(body())
    monkeypatch.setenv("DELTAZIP_REDIS_MAX_CONNECTIONS", "7")
    assert max_connections_default() == 7
    monkeypatch.setenv("DELTAZIP_REDIS_MAX_CONNECTIONS", "0")
    with pytest.raises(ValueError, match="DELTAZIP_REDIS_MAX_CONNECTIONS"):
        max_connections_default()


def test_renew_many_extends_only_live_leases(redis_url):
    """The relay renews every request on a worker in one command; a released request is not brought back (XX)."""
    async def body():
        r = connect(redis_url)
        try:
            workers, queues = WorkerRegistry(r), QueueStats(r, lease_s=1.0)
            for rid in ("a", "b"):
                assert await workers.admit("w1", rid, 0, 1.0)
                await queues.arrive("ft", rid)
            before = dict(await r.zrange(keys.worker_inflight("w1"), 0, -1, withscores=True))
            await workers.release("w1", "b")
            await asyncio.sleep(0.01)
            await workers.renew_many("w1", ["a", "b"], 30.0)
            await queues.renew_many([("ft", "a"), ("ft", "b")])
            after = dict(await r.zrange(keys.worker_inflight("w1"), 0, -1, withscores=True))
            assert set(after) == {"a"} and after["a"] >= before["a"] + 25_000
            pending = dict(await r.zrange(keys.queue_pending("ft"), 0, -1, withscores=True))
            assert set(pending) == {"a", "b"} and pending["a"] > before["a"]
        finally:
            await r.aclose()

    run(body())
