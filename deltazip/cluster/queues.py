"""Per-model queue state shared by schedulers: pending/running counts and an arrival-rate estimate."""

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
local pending = redis.call('HINCRBY', key, 'pending', 1)
redis.call('EXPIRE', key, ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return {pending, tostring(count)}
"""

# Counters never go below zero, even if a scheduler died mid-request and another's decrement races it.
_MOVE = """
local key = KEYS[1]
for i = 1, #ARGV - 1, 2 do
  local v = redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  if v < 0 then redis.call('HSET', key, ARGV[i], 0) end
end
redis.call('EXPIRE', key, ARGV[#ARGV])
return 1
"""


@dataclass(frozen=True, slots=True)
class QueueState:
    """One model's load across the cluster."""

    model: str
    pending: int = 0  # routed, no token yet
    running: int = 0  # streaming tokens
    rate_per_s: float = 0.0  # recent arrivals per second


class QueueStats:
    """Updates and reads `dz:queue:<model>`; the scheduler is its only writer."""

    def __init__(self, redis: aioredis.Redis, tau_s: float = 10.0):
        assert tau_s > 0
        self.redis = redis
        self.tau_s = tau_s
        self._arrive = redis.register_script(_ARRIVE)
        self._move = redis.register_script(_MOVE)

    async def arrive(self, model: str) -> QueueState:
        """A request for `model` arrived: pending += 1 and the rate estimate is updated."""
        pending, count = await self._arrive(keys=[keys.queue(model), keys.queues()],
                                           args=[now_ms(), self.tau_s * 1000, keys.QUEUE_TTL_S, model])
        return QueueState(model, pending=int(pending), rate_per_s=float(count) / self.tau_s)

    async def started(self, model: str) -> None:
        """First token streamed: pending → running."""
        await self._move(keys=[keys.queue(model)], args=["pending", -1, "running", 1, keys.QUEUE_TTL_S])

    async def finished(self, model: str, was_running: bool) -> None:
        """The request ended (done, failed or cancelled)."""
        field = "running" if was_running else "pending"
        await self._move(keys=[keys.queue(model)], args=[field, -1, keys.QUEUE_TTL_S])

    async def get(self, model: str) -> QueueState:
        """Current counts and the arrival rate decayed to now."""
        return self._state(model, await self.redis.hgetall(keys.queue(model)))

    async def active(self) -> list[QueueState]:
        """Every model with queue state (dz:queues), sorted by name; prunes names whose hash expired."""
        names = sorted(await self.redis.smembers(keys.queues()))
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.queue(name))
            rows = await pipe.execute()
        stale = [n for n, row in zip(names, rows) if not row]
        if stale:
            await self.redis.srem(keys.queues(), *stale)
        return [self._state(n, row) for n, row in zip(names, rows) if row]

    def _state(self, model: str, data: dict[str, str]) -> QueueState:
        count = float(data.get("rate_count", 0))
        dt_ms = max(0, now_ms() - int(data.get("rate_updated_ms", now_ms())))
        rate = count * math.exp(-dt_ms / (self.tau_s * 1000)) / self.tau_s
        return QueueState(model, int(data.get("pending", 0)), int(data.get("running", 0)), rate)
