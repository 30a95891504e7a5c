"""Connecting to Redis (asyncio client, str responses)."""

import time

import redis.asyncio as aioredis


def connect(url: str) -> aioredis.Redis:
    """An asyncio Redis client for `url` (e.g. redis://127.0.0.1:6379/0); connects lazily."""
    return aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5, health_check_interval=30)


def now_ms() -> int:
    """Wall-clock time in unix milliseconds (shared across hosts, unlike monotonic clocks)."""
    return int(time.time() * 1000)
