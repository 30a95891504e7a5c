"""Connecting to Redis (asyncio client, str responses)."""

import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def connect(url: str) -> aioredis.Redis:
    """An asyncio Redis client for `url` (e.g. redis://127.0.0.1:6379/0); connects lazily.

    A command on a pooled connection that a restarted Redis closed is retried on a fresh one (a few quick tries),
    so the first request after Redis comes back does not fail.
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3)
    return aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30,
                                   retry=retry, retry_on_error=[RedisConnectionError])


def now_ms() -> int:
    """Wall-clock time in unix milliseconds (shared across hosts, unlike monotonic clocks)."""
    return int(time.time() * 1000)
