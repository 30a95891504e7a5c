"""The scheduler's read/write view of Redis: models, live workers with residency, queues, request records.

Every Redis round trip costs the scheduler's one asyncio thread CPU (redis-py packs, the socket is written and
read, the reply parsed): on the 4-GPU scale-out run the schedulers, not the workers, capped the cluster at 13 ms
of CPU per request. So a request's reads and writes are grouped into as few round trips as its steps allow
(`bench/sched_cost.py` counts them), the index of worker ids is re-read at most every WORKER_IDS_TTL_S (a
worker that died since is dropped by the very snapshot that finds its record gone; a new one is seen within the
TTL, or at once when no known worker can take the request), and the workers' records at most every
WORKER_RECORDS_TTL_S (liveness is still read per request).
"""

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from deltazip.cluster.models import MODEL_NAME, MODEL_NAME_RULE, BaseRecord, ModelRecord, ModelRegistry
from deltazip.cluster.queues import QueueState, QueueStats
from deltazip.cluster.requests import RequestLog, RequestRecord, RequestState
from deltazip.cluster.workers import ClusterSnapshot, WorkerRecord, WorkerRegistry
from deltazip.rpc.errors import FailedPrecondition, InvalidArgument, NotFound
from services.scheduler.routing import Candidate

WORKER_IDS_TTL_S = 1.0  # the worker id index (SMEMBERS) is re-read at most this often
# Worker records (one hash each, rewritten once per heartbeat: 1 s by default) are re-read at most this often;
# in between, each routing snapshot reads only whether each worker is alive, its in-flight count and residency.
WORKER_RECORDS_TTL_S = 0.25


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A servable model: the base, or a registered fine-tune."""

    name: str
    is_base: bool
    record: ModelRecord | None = None
    base_identity: str = ""


class ClusterView:
    """All Redis access of the scheduler goes through here."""

    def __init__(self, redis: aioredis.Redis, base_name: str, rate_tau_s: float, lease_s: float = 10.0,
                 worker_ids_ttl_s: float = WORKER_IDS_TTL_S, worker_records_ttl_s: float = WORKER_RECORDS_TTL_S):
        self.redis = redis
        self.base_name = base_name
        self.models = ModelRegistry(redis)
        self.workers = WorkerRegistry(redis)
        self.queues = QueueStats(redis, tau_s=rate_tau_s, lease_s=lease_s)
        self.requests = RequestLog(redis)
        self.worker_ids_ttl_s = worker_ids_ttl_s
        self._worker_ids: list[str] = []
        self._worker_ids_read = float("-inf")
        self.worker_records_ttl_s = worker_records_ttl_s
        self._records: dict[str, WorkerRecord] = {}
        self._records_read = float("-inf")

    async def base(self) -> ResolvedModel | None:
        """The base model: published by workers in dz:base, else --base-name."""
        return self._base(await self.models.base())

    def _base(self, published: BaseRecord | None) -> ResolvedModel | None:
        if published is not None:
            return ResolvedModel(published.name, True, base_identity=published.identity)
        return ResolvedModel(self.base_name, True) if self.base_name else None

    async def lookup(self, name: str) -> tuple[ModelRecord | None, BaseRecord | None]:
        """The registry entry of `name` and the published base, in one round trip (then `resolve`)."""
        return await self.models.get_with_base(name)

    def resolve(self, name: str, record: ModelRecord | None, published: BaseRecord | None) -> ResolvedModel:
        """The model called `name`, or NOT_FOUND telling the caller how to fix it, from what `lookup` read: its
        registry entry and the published base."""
        if not name:
            raise InvalidArgument("model name is empty; name a model (list them with `deltazip models`)")
        base = self._base(published)
        if record is not None:
            if record.base_identity and base is not None and base.base_identity and record.base_identity != base.base_identity:
                raise FailedPrecondition(
                    f"model {name!r} was compressed against base {record.base_identity[:12]}, but the workers serve "
                    f"{base.name!r} ({base.base_identity[:12]}); compress it again against this base and push it"
                )
            return ResolvedModel(name, False, record, record.base_identity)
        if base is not None and base.name == name:
            return base
        if not MODEL_NAME.fullmatch(name):
            raise InvalidArgument(f"{name!r} is not a valid model name: use {MODEL_NAME_RULE} (list models with "
                                  "`deltazip models`)")
        raise self.not_found(name)

    @staticmethod
    def not_found(name: str) -> NotFound:
        """The one NOT_FOUND for missing models and other tenants' models alike."""
        return NotFound(
            f"model {name!r} is not registered; push it with `deltazip push` or list models with `deltazip models`"
        )

    async def worker_ids(self, fresh: bool = False) -> list[str]:
        """The worker id index, re-read when `fresh`, empty, or older than `worker_ids_ttl_s`."""
        now = time.monotonic()
        if fresh or not self._worker_ids or now - self._worker_ids_read >= self.worker_ids_ttl_s:
            self._worker_ids, self._worker_ids_read = await self.workers.ids(), now
        return self._worker_ids

    async def snapshot(self, models: list[str], fresh: bool = False) -> ClusterSnapshot:
        """Live workers, where each of `models` is on them and their in-flight counts: one round trip (two when the
        id index is re-read)."""
        ids = await self.worker_ids(fresh)
        if not ids:
            return ClusterSnapshot([], {m: {} for m in models}, {}, [])
        now = time.monotonic()
        reread = fresh or now - self._records_read >= self.worker_records_ttl_s
        snap = await self.workers.snapshot(ids, models, None if reread else self._records)
        if reread:
            self._records, self._records_read = {w.worker_id: w for w in snap.records}, now
        else:  # a worker first seen since (the id index was re-read) is kept from now on too
            self._records.update((w.worker_id, w) for w in snap.records)
        if snap.dead:
            self._worker_ids = [wid for wid in self._worker_ids if wid not in snap.dead]
            for wid in snap.dead:
                self._records.pop(wid, None)
        return snap

    async def candidates(self, model: str, is_base: bool, fresh: bool = False) -> list[Candidate]:
        """Every live worker with the nearest tier holding `model` and its in-flight count."""
        return candidates_in(await self.snapshot([] if is_base else [model], fresh), model, is_base)

    async def accepted(self, request_id: str, model: str) -> tuple[RequestRecord | None, QueueState]:
        """A request was accepted: its record QUEUED (the earlier one returned when a client retries the id) and
        its arrival in the model's queue (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.requests.queue_create(pipe, request_id, model)
            self.queues.queue_arrive(pipe, model, request_id)
            replies = await pipe.execute()
        return self.requests.created(replies[0]), self.queues.arrived(model, replies[-1])

    async def streaming(self, request_id: str, model: str) -> None:
        """The first token was relayed: RUNNING, and pending → running in the model's queue (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.requests.queue_state(pipe, request_id, RequestState.RUNNING)
            self.queues.queue_started(pipe, model, request_id)
            await pipe.execute()

    async def ended(self, request_id: str, model: str, state: RequestState, error: str = "",
                    release_from: str = "") -> None:
        """The request ended in `state`: its record, its queue entry and, given `release_from`, its place in that
        worker's queue (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.requests.queue_state(pipe, request_id, state, error)
            self.queues.queue_finished(pipe, model, request_id)
            if release_from:
                self.workers.queue_release(pipe, release_from, request_id)
            await pipe.execute()


def candidates_in(snap: ClusterSnapshot, model: str, is_base: bool) -> list[Candidate]:
    """`snap`'s workers as routing candidates for `model`."""
    return [Candidate(w, None if is_base else snap.nearest[model][w.worker_id], snap.inflight[w.worker_id])
            for w in snap.records]
