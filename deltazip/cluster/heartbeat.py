"""A background loop that refreshes a process's liveness key until stopped."""

import asyncio
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from deltazip.logs import get_logger

log = get_logger("deltazip.cluster")


async def heartbeat_loop(beat: Callable[[], Awaitable[None]], interval_s: float, stop: asyncio.Event) -> None:
    """Call `beat` every `interval_s` until `stop` is set; a Redis outage is logged, not fatal."""
    failing = False
    while not stop.is_set():
        try:
            await beat()
            if failing:
                log.info("heartbeat_recovered")
            failing = False
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("heartbeat_failed", error=str(exc))
            failing = True
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
