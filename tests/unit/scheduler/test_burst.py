"""Burst detection and prefetch target choice (pure functions), and the cold-first eviction choice on real Redis."""

import asyncio

from deltazip.cluster.connection import connect
from deltazip.cluster.queues import QueueState
from deltazip.cluster.workers import Tier, WorkerRecord, WorkerRegistry
from services.scheduler.burst import BurstPolicy, holders_wanted, pick_targets
from services.scheduler.cluster_view import ClusterView
from services.scheduler.prefetch import cold_victim
from services.scheduler.routing import Candidate
from tests.integration.procs import redis_proc, redis_url  # noqa: F401  (fixtures)

POLICY = BurstPolicy(burst_rate_per_s=2.0, burst_pending=8, rate_per_worker=4.0)


def cand(wid: str, tier: Tier | None, inflight: int = 0, slots: int = 2) -> Candidate:
    return Candidate(WorkerRecord(wid, f"{wid}:1", num_device_slots=slots), tier, inflight)


def test_quiet_model_is_not_a_burst():
    assert holders_wanted(QueueState("m", pending=3, rate_per_s=1.9), POLICY, num_live=3) == 0


def test_burst_wants_holders_by_rate_or_queue_capped_by_live_workers():
    assert holders_wanted(QueueState("m", rate_per_s=2.0), POLICY, 3) == 1
    assert holders_wanted(QueueState("m", rate_per_s=9.0), POLICY, 5) == 3
    assert holders_wanted(QueueState("m", pending=17, rate_per_s=0.1), POLICY, 5) == 3
    assert holders_wanted(QueueState("m", rate_per_s=100.0), POLICY, 2) == 2


def test_targets_skip_holders_and_prefer_idle_workers():
    cands = [cand("a", Tier.DEVICE), cand("b", None, inflight=5), cand("c", Tier.DISK), cand("d", None)]
    ids = [c.worker.worker_id for c in pick_targets(cands, Tier.DEVICE, wanted=3, affinity_slack=0, model="m")]
    assert ids == ["c", "d"]  # a already holds it; c (on disk) and d are idle, b is busy
    assert pick_targets(cands, Tier.DEVICE, wanted=1, affinity_slack=0, model="m") == []
    host = pick_targets(cands, Tier.HOST, wanted=2, affinity_slack=0, model="m")
    assert [c.worker.worker_id for c in host] == ["c"]


def test_cold_victim_is_the_coldest_device_resident_and_never_a_hotter_one(redis_url):
    async def body():
        r = connect(redis_url)
        await WorkerRegistry(r).heartbeat(WorkerRecord("w", "w:1"), {Tier.DEVICE: ["lru-hot", "mru-cold"]})
        view = ClusterView(r, "base", 10.0)
        full, roomy = cand("w", None, slots=2), cand("w", None, slots=3)
        rates = {"lru-hot": 5.0, "mru-cold": 0.1, "new": 3.0}
        assert await cold_victim(view, full, "new", rates) == "mru-cold"  # plain LRU would drop lru-hot
        assert await cold_victim(view, roomy, "new", rates) is None  # a slot is free
        assert await cold_victim(view, full, "new", {"lru-hot": 5.0, "mru-cold": 4.0, "new": 3.0}) is None
        assert await cold_victim(view, cand("w", None, slots=0), "new", rates) is None  # slots unknown
        await r.aclose()

    asyncio.run(body())


def test_one_replica_of_many_prefetches_a_bursting_model_per_window(redis_url):
    from deltazip.cluster.models import ModelRecord, ModelRegistry
    from deltazip.rpc.channels import ChannelPool
    from services.scheduler.burst import BurstPrefetcher
    from tests.integration.fake_worker import FakeWorker

    fake = FakeWorker("w1")

    async def body():
        r = connect(redis_url)
        await ModelRegistry(r).set_base("base")
        await ModelRegistry(r).register(ModelRecord("hot"))
        await WorkerRegistry(r).heartbeat(WorkerRecord("w1", fake.address, num_device_slots=2), {})
        view = ClusterView(r, "base", rate_tau_s=1.0)
        for i in range(5):  # 5 arrivals within tau = 1 s: about 5 per second
            await view.queues.arrive("hot", f"r{i}")
        await view.queues.arrive("base", "r-base")  # the base is never prefetched
        channels = ChannelPool()
        replicas = [BurstPrefetcher(view, channels, BurstPolicy(window_s=30), f"s{i}", affinity_slack=1) for i in range(2)]
        decisions = [await replica.check() for replica in replicas]
        assert decisions == [[("hot", ["w1"])], []]
        for _ in range(100):
            if fake.loads:
                break
            await asyncio.sleep(0.02)
        assert [load.model for load in fake.loads] == ["hot"]
        await channels.close()
        await r.aclose()

    try:
        asyncio.run(body())
    finally:
        fake.stop()
