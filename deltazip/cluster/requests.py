"""Request records: one hash per request with its state, worker and attempts, expiring after REQUEST_TTL_S."""

from dataclasses import dataclass
from enum import Enum

import redis.asyncio as aioredis

from deltazip.cluster import keys
from deltazip.cluster.connection import now_ms
from deltazip.cluster.records import from_hash


class RequestState(Enum):
    """Lifecycle of a Generate request; Redis stores `.value`."""

    QUEUED = "queued"  # accepted, not routed yet
    ROUTED = "routed"  # sent to a worker, no token yet
    RUNNING = "running"  # tokens are streaming
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """`dz:request:<id>` as read back."""

    request_id: str
    model: str = ""
    state: str = RequestState.QUEUED.value
    worker_id: str = ""
    tier: str = ""  # where the delta was on that worker when routed: device|host|disk|remote
    attempts: int = 0
    created_ms: int = 0
    updated_ms: int = 0
    error: str = ""

    @property
    def request_state(self) -> RequestState:
        return RequestState(self.state)


class RequestLog:
    """Writes request records (scheduler) and reads them (anyone)."""

    def __init__(self, redis: aioredis.Redis, ttl_s: int = keys.REQUEST_TTL_S):
        self.redis = redis
        self.ttl_s = ttl_s

    async def create(self, request_id: str, model: str) -> RequestRecord | None:
        """Record an accepted request as QUEUED; returns the earlier record when a client retries the same id.

        A retry keeps `created_ms` and keeps counting `attempts`, so each attempt reaches a worker under a new
        attempt number (never colliding with a run of the earlier call still being cancelled there).
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_create(pipe, request_id, model)
            earlier, *_ = await pipe.execute()
        return self.created(earlier)

    def queue_create(self, pipe, request_id: str, model: str) -> None:
        """`create`'s commands, added to a pipeline the caller executes; the first reply goes to `created`."""
        now = now_ms()
        key = keys.request(request_id)
        pipe.hgetall(key)
        pipe.hsetnx(key, "created_ms", now)
        pipe.hsetnx(key, "attempts", 0)
        pipe.hset(key, mapping={"request_id": request_id, "model": model, "state": RequestState.QUEUED.value,
                                "updated_ms": now, "worker_id": "", "tier": "", "error": ""})
        pipe.expire(key, self.ttl_s)

    @staticmethod
    def created(earlier: dict) -> RequestRecord | None:
        """The earlier record a `queue_create` found (its first reply), or None for a new request."""
        return from_hash(RequestRecord, earlier) if earlier else None

    async def routed(self, request_id: str, worker_id: str, tier: str = "") -> int:
        """The request was sent to `worker_id` (attempts += 1); returns the attempt number."""
        async with self.redis.pipeline(transaction=True) as pipe:
            key = keys.request(request_id)
            pipe.hset(key, mapping={"state": RequestState.ROUTED.value, "worker_id": worker_id, "tier": tier,
                                    "updated_ms": now_ms()})
            pipe.hincrby(key, "attempts", 1)
            pipe.expire(key, self.ttl_s)
            _, attempts, _ = await pipe.execute()
        return int(attempts)

    async def set_state(self, request_id: str, state: RequestState, error: str = "") -> None:
        """Move the request to `state` (RUNNING on first token, or a terminal state)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_state(pipe, request_id, state, error)
            await pipe.execute()

    def queue_state(self, pipe, request_id: str, state: RequestState, error: str = "") -> None:
        """`set_state`'s commands, added to a pipeline the caller executes (with other bookkeeping)."""
        key = keys.request(request_id)
        pipe.hset(key, mapping={"state": state.value, "error": error, "updated_ms": now_ms()})
        pipe.expire(key, self.ttl_s)

    async def get(self, request_id: str) -> RequestRecord | None:
        """The record, or None once it expired (or never existed)."""
        data = await self.redis.hgetall(keys.request(request_id))
        return from_hash(RequestRecord, data) if data else None
