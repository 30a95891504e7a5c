"""Connecting to Redis (asyncio client, str responses)."""

import os
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

MAX_CONNECTIONS = 64  # per process; DELTAZIP_REDIS_MAX_CONNECTIONS overrides
POOL_WAIT_S = 20.0  # a command waits this long for a free pooled connection, then fails (UNAVAILABLE upstream)


def max_connections_default() -> int:
    """The pool size: DELTAZIP_REDIS_MAX_CONNECTIONS, else MAX_CONNECTIONS."""
    raw = os.environ.get("DELTAZIP_REDIS_MAX_CONNECTIONS", "")
    try:
        value = int(raw) if raw else MAX_CONNECTIONS
    except ValueError:
        raise ValueError(f"DELTAZIP_REDIS_MAX_CONNECTIONS must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"DELTAZIP_REDIS_MAX_CONNECTIONS must be >= 1, got {value}")
    return value


def connect(url: str, max_connections: int | None = None, pool_wait_s: float = POOL_WAIT_S) -> aioredis.Redis:
    """An asyncio Redis client for `url` (e.g. redis://127.0.0.1:6379/0); connects lazily.

    Its pool holds at most `max_connections` connections and a command waits for a free one: a scheduler with a
    thousand requests in flight must queue its Redis commands, not fail them. (redis-py's plain pool raises "Too
    many connections" past 100 concurrent commands, which failed requests and worker heartbeats under load.)
    A command on a pooled connection that a restarted Redis closed is retried on a fresh one (a few quick tries),
    so the first request after Redis comes back does not fail.
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections or max_connections_default(), timeout=pool_wait_s,
        decode_responses=True, socket_connect_timeout=5, health_check_interval=30, retry=retry,
        retry_on_error=[RedisConnectionError])
    return aioredis.Redis.from_pool(pool)


def now_ms() -> int:
    """Wall-clock time in unix milliseconds (shared across hosts, unlike monotonic clocks)."""
    return int(time.time() * 1000)
