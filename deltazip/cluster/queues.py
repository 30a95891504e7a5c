"""Per-model queue state shared by schedulers: pending/running requests (leased) and an arrival-rate estimate.

Pending and running requests are zset members scored by a lease expiry that the relaying scheduler renews:
a scheduler killed mid-request leaves no count behind once its leases run out.
"""

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from deltazip.cluster import keys
from deltazip.cluster.connection import now_ms

# Arrival rate = exponentially decayed count of arrivals / tau: a burst shows up within ~tau seconds.
_ARRIVE = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local tau_ms = tonumber(ARGV[2])
local count = tonumber(redis.call('HGET', key, 'rate_count') or '0')
local last = tonumber(redis.call('HGET', key, 'rate_updated_ms') or ARGV[1])
local dt = math.max(0, now - last)
count = count * math.exp(-dt / tau_ms) + 1
redis.call('HSET', key, 'rate_count', tostring(count), 'rate_updated_ms', ARGV[1])
redis.call('EXPIRE', key, ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {redis.call('ZCARD', KEYS[3]), tostring(count)}
"""

@dataclass(frozen=True, slots=True)
class QueueState:
    """One model's load across the cluster."""

    model: str
    pending: int = 0  # routed, no token yet
    running: int = 0  # streaming tokens
    rate_per_s: float = 0.0  # recent arrivals per second


class QueueStats:
    """Updates and reads `dz:queue:<model>` (+ `:pending`, `:running`); the scheduler is its only writer."""

    def __init__(self, redis: aioredis.Redis, tau_s: float = 10.0, lease_s: float = 10.0):
        assert tau_s > 0 and lease_s > 0
        self.redis = redis
        self.tau_s = tau_s
        self.lease_ms = int(lease_s * 1000)

    async def arrive(self, model: str, request_id: str) -> QueueState:
        """A request for `model` arrived: it is pending and the rate estimate is updated."""
        return self.arrived(model, await self.redis.eval(*self._arrive_call(model, request_id)))

    def queue_arrive(self, pipe, model: str, request_id: str) -> None:
        """`arrive`'s script, added to a pipeline the caller executes; its reply goes to `arrived`."""
        pipe.eval(*self._arrive_call(model, request_id))

    def arrived(self, model: str, reply) -> QueueState:
        """The queue state the arrival script replied."""
        pending, count = reply
        return QueueState(model, pending=int(pending), rate_per_s=float(count) / self.tau_s)

    def _arrive_call(self, model: str, request_id: str) -> tuple:
        """EVAL's arguments for the arrival script. EVAL, not a registered script's EVALSHA: in a pipeline redis-py
        first asks Redis whether the script is loaded, one more round trip."""
        now = now_ms()
        return (_ARRIVE, 3, keys.queue(model), keys.queues(), keys.queue_pending(model),
                now, self.tau_s * 1000, keys.QUEUE_TTL_S, model, request_id, now + self.lease_ms)

    async def started(self, model: str, request_id: str) -> None:
        """First token streamed: pending → running."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_started(pipe, model, request_id)
            await pipe.execute()

    def queue_started(self, pipe, model: str, request_id: str) -> None:
        """`started`'s commands, added to a pipeline the caller executes."""
        pipe.zrem(keys.queue_pending(model), request_id)
        pipe.zadd(keys.queue_running(model), {request_id: now_ms() + self.lease_ms})
        pipe.expire(keys.queue_running(model), keys.QUEUE_TTL_S)

    async def renew_many(self, requests: list[tuple[str, str]]) -> None:
        """Extend the leases of many (model, request_id) pairs in whichever of pending/running holds each (XX: never
        resurrect a finished one), one round trip."""
        if not requests:
            return
        expiry = now_ms() + self.lease_ms
        by_model: dict[str, dict[str, int]] = {}
        for model, request_id in requests:
            by_model.setdefault(model, {})[request_id] = expiry
        async with self.redis.pipeline(transaction=False) as pipe:
            for model, members in by_model.items():
                for key in (keys.queue_pending(model), keys.queue_running(model)):
                    pipe.zadd(key, members, xx=True)
            await pipe.execute()

    async def finished(self, model: str, request_id: str) -> None:
        """The request ended (done, failed or cancelled)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_finished(pipe, model, request_id)
            await pipe.execute()

    def queue_finished(self, pipe, model: str, request_id: str) -> None:
        """`finished`'s commands, added to a pipeline the caller executes."""
        pipe.zrem(keys.queue_pending(model), request_id)
        pipe.zrem(keys.queue_running(model), request_id)

    async def get(self, model: str) -> QueueState:
        """Current counts and the arrival rate decayed to now."""
        return (await self._read([model]))[0]

    async def active(self) -> list[QueueState]:
        """Every model with queue state (dz:queues), sorted by name; prunes names whose hash expired."""
        names = sorted(await self.redis.smembers(keys.queues()))
        states = await self._read(names)
        stale = [n for n, st in zip(names, states) if st is None]
        if stale:
            await self.redis.srem(keys.queues(), *stale)
        return [st for st in states if st is not None]

    async def _read(self, models: list[str]) -> list[QueueState | None]:
        if not models:
            return []
        now = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hgetall(keys.queue(model))
                pipe.zcount(keys.queue_pending(model), now, "+inf")
                pipe.zcount(keys.queue_running(model), now, "+inf")
            rows = await pipe.execute()
        states = []
        for i, model in enumerate(models):
            data, pending, running = rows[3 * i : 3 * i + 3]
            states.append(self._state(model, data, pending, running) if data or pending or running else None)
        return states

    def _state(self, model: str, data: dict[str, str], pending: int, running: int) -> QueueState:
        count = float(data.get("rate_count", 0))
        dt_ms = max(0, now_ms() - int(data.get("rate_updated_ms", now_ms())))
        rate = count * math.exp(-dt_ms / (self.tau_s * 1000)) / self.tau_s
        return QueueState(model, int(pending), int(running), rate)
