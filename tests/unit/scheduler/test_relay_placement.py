"""The relay's queue place when a caller stops reading early (the client went away): closing Relay.generate must
leave the worker in `placement` at once, so the caller's end bookkeeping gives that place back. Left to the
garbage collector, the attempt set it after the bookkeeping had run, and the place stayed taken until its lease
expired (the flaky `test_full_queues_are_resource_exhausted_with_retry_advice` of session 15's CI run)."""

import asyncio
import contextlib
from types import SimpleNamespace

from deltazip.cluster.workers import WorkerRecord
from deltazip.v1 import common_pb2, scheduler_pb2
from services.scheduler import relay as relay_module
from services.scheduler.relay import Placement, QueueLimits, Relay
from services.scheduler.routing import Candidate
from services.scheduler.validation import GenerateJob


class FakeCall:
    """A worker's Generate stream: one token per read until cancelled."""

    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        return common_pb2.GenerateChunk(token_ids=[0])


class FakeView:
    def __init__(self):
        self.released: list[tuple[str, str]] = []
        record = WorkerRecord(worker_id="w1", address="127.0.0.1:1")
        self.workers = SimpleNamespace(admit=self._admit, release=self._release, alive=self._alive,
                                       renew_many=self._nothing)
        self.queues = SimpleNamespace(renew_many=self._nothing)
        self.requests = SimpleNamespace(routed=self._routed)
        self._candidates = [Candidate(record, None)]

    async def candidates(self, model, is_base, fresh=False):
        return self._candidates

    async def streaming(self, request_id, model):
        pass

    async def _admit(self, worker_id, request_id, limit, lease_s):
        return True

    async def _release(self, worker_id, request_id):
        self.released.append((worker_id, request_id))

    async def _alive(self, worker_id):
        return True

    async def _routed(self, request_id, worker_id, tier):
        return 1

    async def _nothing(self, *args):
        pass


def test_closing_generate_early_leaves_the_place_to_the_caller_at_once(monkeypatch):
    calls = []

    def stub(channel):
        def generate(request, timeout=None):
            calls.append(FakeCall())
            return calls[-1]
        return SimpleNamespace(Generate=generate)

    monkeypatch.setattr(relay_module.worker_pb2_grpc, "WorkerStub", stub)

    async def body():
        view = FakeView()
        relay = Relay(view, SimpleNamespace(get=lambda address: None), max_attempts=2, affinity_slack=0,
                      limits=QueueLimits(worker_check_s=60.0))
        job = GenerateJob("r1", "ft-a", scheduler_pb2.GenerateRequest(model="ft-a", prompt="hi"))
        placement = Placement()
        async with contextlib.aclosing(relay.generate(job, True, lambda: None, placement)) as chunks:
            async for chunk in chunks:
                assert list(chunk.token_ids) == [0]
                break  # the client went away after its first token
        assert placement.worker_id == "w1"  # the caller gives the place back with its end bookkeeping
        assert view.released == []  # not given back twice
        assert calls[0].cancelled  # the worker's call is cancelled, so it stops the request's GPU work
        assert not relay._watched  # and no longer watched

    asyncio.run(body())


def test_a_stream_closed_mid_write_gives_its_queue_place_back_before_it_is_gone():
    """The servicer end of the same path: grpc closes Generate's stream at a yield (the client went away while a
    chunk was being written). The request's end bookkeeping must run before that close returns, with the worker
    whose place the relay held; the relay's generator is closed first, so it has said which worker that is."""
    from services.scheduler.server import SchedulerServicer

    finished = []

    class FakeRelay:
        async def generate(self, job, is_base, time_remaining, placement):
            try:
                while True:
                    yield common_pb2.GenerateChunk(token_ids=[0])
            finally:  # as Relay._attempt: the place is the caller's once the attempt is over
                placement.worker_id = "w1"

    async def accepted(request_id, model):
        return None, SimpleNamespace(pending=0, rate_per_s=0.0)

    async def resolve(principal, name):
        return SimpleNamespace(is_base=True)

    async def finish(job, state, error, release_from):
        finished.append((job.request_id, state.value, release_from))

    servicer = SchedulerServicer.__new__(SchedulerServicer)
    servicer.auth = SimpleNamespace(require=lambda context, scope, what: SimpleNamespace(tenant=""))
    servicer.config = SimpleNamespace(max_tokens_limit=4096)
    servicer.view = SimpleNamespace(accepted=accepted)
    servicer.relay = FakeRelay()
    servicer._resolve_visible = resolve
    servicer._finish = finish
    context = SimpleNamespace(time_remaining=lambda: None)

    async def body():
        stream = servicer.Generate(scheduler_pb2.GenerateRequest(model="ft-a", prompt="hi", request_id="r1"), context)
        assert list((await stream.__anext__()).token_ids) == [0]
        await stream.aclose()  # grpc's close of a stream whose client went away
        assert finished == [("r1", "cancelled", "w1")]

    asyncio.run(body())
