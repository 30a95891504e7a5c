"""The relay's per-worker watch: one heartbeat check and one lease renewal for all requests relayed from a worker,
and every one of them cancelled once the heartbeat is gone."""

import asyncio
from types import SimpleNamespace

from services.scheduler.relay import QueueLimits, Relay
from services.scheduler.validation import GenerateJob


class FakeView:
    def __init__(self):
        self.alive = {"w1": True, "w2": True}
        self.calls: list[tuple] = []
        self.workers = SimpleNamespace(alive=self._alive, renew_many=self._renew_workers)
        self.queues = SimpleNamespace(renew_many=self._renew_queues)

    async def _alive(self, wid):
        self.calls.append(("alive", wid))
        return self.alive[wid]

    async def _renew_workers(self, wid, request_ids, lease_s):
        self.calls.append(("renew", wid, tuple(sorted(request_ids)), lease_s))

    async def _renew_queues(self, pairs):
        self.calls.append(("queues", tuple(sorted(pairs))))


class FakeCall:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


def test_one_watch_per_worker_renews_all_and_cancels_all_when_it_dies():
    async def body():
        view = FakeView()
        relay = Relay(view, channels=None, max_attempts=1, affinity_slack=0,
                      limits=QueueLimits(worker_check_s=0.05, lease_s=10.0))
        calls = {rid: FakeCall() for rid in ("r1", "r2", "r3")}
        w1 = [relay._register("w1", GenerateJob(rid, "ft-a", None), calls[rid]) for rid in ("r1", "r2")]
        w2 = relay._register("w2", GenerateJob("r3", "ft-b", None), calls["r3"])
        assert len(relay._watch_tasks) == 2
        await asyncio.sleep(0.08)
        assert ("renew", "w1", ("r1", "r2"), 10.0) in view.calls and ("renew", "w2", ("r3",), 10.0) in view.calls
        assert ("queues", (("ft-a", "r1"), ("ft-a", "r2"))) in view.calls
        assert sum(c[0] == "alive" and c[1] == "w1" for c in view.calls) == 1  # one check for both requests
        view.alive["w1"] = False
        await asyncio.sleep(0.06)
        assert all(e.dead for e in w1) and calls["r1"].cancelled and calls["r2"].cancelled
        assert not w2.dead and not calls["r3"].cancelled
        for entry in w1:
            relay._unregister("w1", entry)
        relay._unregister("w2", w2)
        await asyncio.sleep(0)
        assert not relay._watched and not relay._watch_tasks  # the tasks end with their last request

    asyncio.run(body())
