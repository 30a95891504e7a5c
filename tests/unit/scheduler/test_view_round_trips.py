"""The scheduler's request bookkeeping against a real redis-server: acceptance (record + queue arrival) and the
end (record + queue + the worker's queue place) are one round trip each and leave what the separate calls left."""

import asyncio

from deltazip.cluster import keys
from deltazip.cluster.connection import connect
from deltazip.cluster.requests import RequestState
from deltazip.cluster.workers import WorkerRegistry
from services.scheduler.cluster_view import ClusterView
from tests.integration.procs import redis_proc, redis_url  # noqa: F401  (fixtures)


class Counting:
    """Counts round trips: one per executed pipeline or plain command of the wrapped client."""

    def __init__(self, redis):
        self.redis, self.round_trips = redis, 0
        original = redis.pipeline

        def pipeline(*args, **kwargs):
            pipe = original(*args, **kwargs)
            execute = pipe.execute

            async def counted(*a, **k):
                self.round_trips += 1
                return await execute(*a, **k)

            pipe.execute = counted
            return pipe

        redis.pipeline = pipeline
        command = redis.execute_command  # a command outside a pipeline (a pipeline queues its own)

        async def counted_command(*args, **kwargs):
            self.round_trips += 1
            return await command(*args, **kwargs)

        redis.execute_command = counted_command


def test_accept_and_end_are_one_round_trip_each_and_a_retry_finds_the_earlier_record(redis_url):
    async def body():
        r = connect(redis_url)
        counting = Counting(r)
        view = ClusterView(r, "base", rate_tau_s=10.0, lease_s=60.0)
        earlier, queue = await view.accepted("r1", "ft")
        assert counting.round_trips == 1
        assert earlier is None and queue.pending == 1 and queue.rate_per_s > 0
        record = await view.requests.get("r1")
        assert (record.request_state, record.model, record.attempts) == (RequestState.QUEUED, "ft", 0)
        assert await view.workers.admit("w1", "r1", limit=4, lease_s=60.0)
        await view.requests.routed("r1", "w1")
        await view.streaming("r1", "ft")
        counting.round_trips = 0
        await view.ended("r1", "ft", RequestState.FINISHED, release_from="w1")
        assert counting.round_trips == 1
        assert (await view.requests.get("r1")).request_state == RequestState.FINISHED
        assert await r.zcard(keys.worker_inflight("w1")) == 0  # the worker's queue place is given back
        state = await view.queues.get("ft")
        assert (state.pending, state.running) == (0, 0)
        earlier, queue = await view.accepted("r1", "ft")  # a client retry of the same id
        assert earlier is not None and earlier.attempts == 1 and queue.pending == 1
        await view.ended("r1", "ft", RequestState.CANCELLED)  # no place held: nothing else touched
        assert await WorkerRegistry(r).admit("w1", "r2", limit=1, lease_s=60.0)
        await r.aclose()

    asyncio.run(body())
