"""Running one Generate: admit to a worker's bounded queue, relay its stream, retry elsewhere before any token.

A worker whose heartbeat expires while a request waits on it counts as failed: the request is re-routed
(nothing streamed yet) or ends UNAVAILABLE saying it can be retried (tokens already streamed). One watch task per
worker (not per request) checks the heartbeat and renews the leases of every request relayed to it in two
commands: with a thousand requests queued, per-request checks cost a scheduler half a core (4-GPU scale-out run).
"""

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from redis.exceptions import RedisError

from deltazip.logs import bind_fields, get_logger
from deltazip.rpc.channels import ChannelPool
from deltazip.rpc.errors import ResourceExhausted, ServiceError, Unavailable
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.scheduler.cluster_view import ClusterView
from services.scheduler.routing import Candidate, rank
from services.scheduler.validation import GenerateJob

log = get_logger("scheduler")

# A worker answering with these failed for reasons another worker may not share.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
})


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Bounds on each worker's queue and the liveness/lease timing of a relayed request."""

    max_queue_per_worker: int = 32  # 0 = unbounded
    max_queued_tokens_per_worker: int = 0  # 0 = off
    retry_after_s: float = 1.0
    lease_s: float = 10.0
    worker_check_s: float = 1.0


class WorkerFailed(Exception):
    """The chosen worker's stream broke; `num_tokens` were already relayed."""

    def __init__(self, worker_id: str, code: grpc.StatusCode, details: str, num_tokens: int):
        super().__init__(f"{worker_id}: {code.name}: {details}")
        self.worker_id = worker_id
        self.code = code
        self.details = details
        self.num_tokens = num_tokens


@dataclass(slots=True)
class Placement:
    """The worker whose queue place a relayed request still holds once `Relay.generate` is done ('' = none): the
    caller gives it back with the request's end bookkeeping, in the same round trip."""

    worker_id: str = ""


@dataclass(eq=False, slots=True)
class _Watched:
    """A request being relayed from a worker; `dead` once that worker's heartbeat was found expired."""

    job: GenerateJob
    call: object  # the worker's Generate call (cancelled when the worker is found dead)
    dead: bool = field(default=False)


class Relay:
    """Generate's unit of work, shared by all requests of this scheduler (holds no request state)."""

    def __init__(self, view: ClusterView, channels: ChannelPool, max_attempts: int, affinity_slack: int,
                 limits: QueueLimits = QueueLimits()):
        self.view = view
        self.channels = channels
        self.max_attempts = max_attempts
        self.affinity_slack = affinity_slack
        self.limits = limits
        self._watched: dict[str, set[_Watched]] = {}  # worker id -> requests relayed from it now
        self._watch_tasks: dict[str, asyncio.Task] = {}

    async def generate(self, job: GenerateJob, is_base: bool, time_remaining,
                       placement: Placement | None = None) -> AsyncIterator[common_pb2.GenerateChunk]:
        """Chunks for `job`; `time_remaining()` is the client's deadline (None = none). A place in a failed worker's
        queue is given back before the next attempt; the last attempt's place is left in `placement` for the caller
        to give back (None: given back here too), set once this generator is exhausted or closed: a caller that
        stops early must close it (`contextlib.aclosing`) before reading `placement`."""
        tried: list[str] = []
        last_error: WorkerFailed | None = None
        while len(tried) < self.max_attempts:
            worker = await self._choose(job, is_base, exclude=set(tried))
            if worker is None:
                break
            tried.append(worker.worker.worker_id)
            try:
                # closed here, not whenever the garbage collector gets to it: a caller that stops reading (the client
                # went away) closes this generator, and only the attempt's own exit tells `placement` which queue
                # place the caller must give back before its end bookkeeping runs
                async with contextlib.aclosing(self._attempt(job, worker, time_remaining, placement)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except WorkerFailed as failed:
                last_error = failed
                if failed.num_tokens:
                    raise Unavailable(
                        f"worker {failed.worker_id} failed after streaming {failed.num_tokens} tokens "
                        f"({failed.code.name}: {failed.details}); the request can be retried"
                    ) from None
                if failed.code not in RETRYABLE:  # the worker's verdict on the request itself, e.g. prompt too long
                    raise ServiceError(failed.details or failed.code.name, failed.code) from None
                log.warning("worker_attempt_failed", worker=failed.worker_id, attempt=len(tried),
                            code=failed.code.name, message=failed.details)
        if last_error is None:
            raise Unavailable(
                "no live worker to run this request; start one with `python -m services.worker` and check that it "
                "reaches the same Redis as this scheduler (its heartbeat keys dz:worker:*)"
            )
        raise Unavailable(
            f"{len(tried)} worker(s) failed before producing a token (last: {last_error}); retry the request"
        )

    async def _choose(self, job: GenerateJob, is_base: bool, exclude: set[str]) -> Candidate | None:
        """The best worker that admits the request into its queue; RESOURCE_EXHAUSTED when all are full."""
        live = [c for c in await self.view.candidates(job.model, is_base) if c.worker.worker_id not in exclude]
        if not live:  # a worker may have joined since the id index was read
            live = [c for c in await self.view.candidates(job.model, is_base, fresh=True)
                    if c.worker.worker_id not in exclude]
        max_tokens = self.limits.max_queued_tokens_per_worker
        open_ = [c for c in live if not max_tokens or c.worker.queued_tokens < max_tokens]
        for candidate in rank(open_, self.affinity_slack, salt=job.request_id):
            if await self.view.workers.admit(candidate.worker.worker_id, job.request_id,
                                             self.limits.max_queue_per_worker, self.limits.lease_s):
                return candidate
        if live:
            raise ResourceExhausted(
                f"all {len(live)} live worker(s) are at their queue limit ({self.limits.max_queue_per_worker} "
                f"requests or {max_tokens or 'unbounded'} queued tokens each); retry after "
                f"{self.limits.retry_after_s:g} s with backoff, or add workers"
            )
        return None

    async def _attempt(self, job: GenerateJob, chosen: Candidate, time_remaining, placement: Placement | None):
        worker = chosen.worker
        wid = worker.worker_id
        keep = placement is not None  # the place goes back with the caller's end bookkeeping, unless retried
        try:  # the queue place was taken in _choose: every path below gives it back or hands it to the caller
            bind_fields(worker=wid)
            tier = chosen.tier.value if chosen.tier else "remote"
            attempt = await self.view.requests.routed(job.request_id, wid, tier)
            log.info("request_routed", attempt=attempt, tier=tier, load=chosen.load)
            stub = worker_pb2_grpc.WorkerStub(self.channels.get(worker.address))
            call = stub.Generate(worker_request(job, attempt), timeout=time_remaining())
            watch = self._register(wid, job, call)
            num_tokens = 0
            try:
                async for chunk in call:
                    if not num_tokens and chunk.token_ids:
                        await _best_effort(self.view.streaming(job.request_id, job.model))
                    num_tokens += len(chunk.token_ids)
                    chunk.request_id = job.request_id
                    chunk.worker_id = chunk.worker_id or wid
                    chunk.model = chunk.model or job.model
                    yield chunk
            except grpc.aio.AioRpcError as exc:
                keep = False
                if watch.dead:
                    raise WorkerFailed(wid, grpc.StatusCode.UNAVAILABLE, _EXPIRED, num_tokens) from None
                raise WorkerFailed(wid, exc.code(), exc.details() or "", num_tokens) from None
            except asyncio.CancelledError:
                if watch.dead:  # we cancelled the call ourselves, not the client
                    keep = False
                    raise WorkerFailed(wid, grpc.StatusCode.UNAVAILABLE, _EXPIRED, num_tokens) from None
                raise
            finally:
                self._unregister(wid, watch)
                call.cancel()  # no-op when finished; stops the worker's GPU work when the client went away
        finally:  # a place not given back (Redis down) expires with its lease
            if keep:
                placement.worker_id = wid
            else:
                await asyncio.shield(_best_effort(self.view.workers.release(wid, job.request_id)))

    def _register(self, worker_id: str, job: GenerateJob, call) -> _Watched:
        """Watch `call` with the other requests on `worker_id`: one task per worker checks and renews for all."""
        entry = _Watched(job, call)
        self._watched.setdefault(worker_id, set()).add(entry)
        task = self._watch_tasks.get(worker_id)
        if task is None or task.done():  # an empty context: the task outlives the request that started it
            self._watch_tasks[worker_id] = asyncio.create_task(self._watch_worker(worker_id),
                                                               context=contextvars.Context())
        return entry

    def _unregister(self, worker_id: str, entry: _Watched) -> None:
        entries = self._watched.get(worker_id)
        if entries is None:
            return
        entries.discard(entry)
        if not entries:
            del self._watched[worker_id]
            task = self._watch_tasks.pop(worker_id, None)
            if task is not None:
                task.cancel()

    async def _watch_worker(self, worker_id: str) -> None:
        """Every worker_check_s: the worker's heartbeat (one EXISTS) and the leases of every request relayed from
        it (one ZADD, one pipeline); once the heartbeat is gone, cancel each of those calls."""
        while True:
            await asyncio.sleep(self.limits.worker_check_s)
            if not self._watched.get(worker_id):
                return
            entries = [e for e in self._watched[worker_id] if not e.dead]
            if not entries:
                continue
            try:
                if not await self.view.workers.alive(worker_id):
                    log.warning("worker_heartbeat_expired", worker=worker_id, num_requests=len(entries),
                                request_ids=[e.job.request_id for e in entries[:20]])
                    for entry in entries:
                        entry.dead = True
                        entry.call.cancel()
                    continue  # requests registered later (routed before the expiry was seen) are checked too
                await self.view.workers.renew_many(worker_id, [e.job.request_id for e in entries], self.limits.lease_s)
                await self.view.queues.renew_many([(e.job.model, e.job.request_id) for e in entries])
            except (RedisError, OSError) as exc:  # Redis down: keep relaying, the streams themselves are fine
                log.warning("worker_check_failed", worker=worker_id, error=str(exc))


_EXPIRED = "its heartbeat expired (the worker died or hangs)"


async def _best_effort(*updates) -> None:
    """Await Redis bookkeeping of a request being relayed; an outage is logged, never fails the stream."""
    try:
        for update in updates:
            await update
    except (RedisError, OSError) as exc:
        for update in updates:
            if asyncio.iscoroutine(update):
                update.close()  # not awaited because an earlier one failed
        log.warning("request_bookkeeping_failed", error=str(exc))


def worker_request(job: GenerateJob, attempt: int) -> worker_pb2.WorkerGenerateRequest:
    """The worker's request for `job`."""
    request = worker_pb2.WorkerGenerateRequest(request_id=job.request_id, model=job.model, attempt=attempt)
    request.sampling.CopyFrom(job.request.sampling)
    if job.request.WhichOneof("input") == "messages":
        request.messages.CopyFrom(job.request.messages)
    else:
        request.prompt = job.request.prompt
    return request
