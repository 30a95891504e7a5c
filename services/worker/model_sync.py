"""Follow the model registry at runtime: drop deltas that were deleted or overwritten from every local tier.

DeltaZip's original system fixes its models at launch; here the store registers and unregisters models in
Redis while everything runs. Every `interval_s` the worker compares what it holds with `dz:models`:
a delta whose entry disappeared (deleted) or changed (pushed again with --overwrite) is evicted from
device, host and disk. A delta that requests still use is pinned, so eviction fails and is retried on the
next tick: in-flight requests drain, while the scheduler already answers NOT_FOUND to new ones.
"""

import asyncio

from redis.exceptions import RedisError

from deltazip.cluster.models import ModelRegistry
from deltazip.logs import get_logger
from services.worker.residency import ResidencyManager, Tier

log = get_logger("worker.model_sync")


class ModelSync:
    """Owns no deltas: asks the ResidencyManager (their owner) to evict stale ones.

    A held copy is stale when its registry entry is gone, changed since the previous check, or reappeared
    for a name this worker held before: the copy may predate the change (the worker does not record which
    version it fetched), so it is dropped and the next request fetches the current one. A name new to this
    worker is trusted. Stale names stay marked until evicted.
    """

    def __init__(self, registry: ModelRegistry, residency: ResidencyManager, interval_s: float = 1.0):
        self.registry = registry
        self.residency = residency
        self.interval_s = interval_s
        self._last: dict[str, tuple[int, int]] | None = None  # registry at the previous check: name -> version
        self._stale: dict[str, str] = {}  # name -> reason, until evicted
        self._held_before: set[str] = set()  # names held at some earlier check

    async def run(self, stop: asyncio.Event) -> None:
        """Check every interval until `stop` is set; Redis outages are logged and retried."""
        while not stop.is_set():
            try:
                await self.sync_once()
            except (RedisError, OSError) as exc:
                log.warning("model_sync_failed", error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def sync_once(self) -> list[str]:
        """One comparison; returns the names evicted now."""
        current = {r.name: (r.created_unix_ms, r.artifact_bytes) for r in await self.registry.list()}
        last, self._last = self._last, current
        held = [d.name for d in self.residency.snapshot() if d.tier is not Tier.REMOTE]
        for name in held:
            if name not in current:
                self._stale.setdefault(name, "deleted")
            elif last is not None and last.get(name) != current[name] and (name in last or name in self._held_before):
                self._stale.setdefault(name, "replaced")
        self._held_before.update(held)
        evicted = []
        for name, reason in list(self._stale.items()):
            if name not in held or self.residency.evict(name, Tier.DISK):
                del self._stale[name]
                if name in held:
                    evicted.append(name)
                    log.info("delta_dropped", model=name, reason=reason)
            else:
                log.debug("delta_drop_waits", model=name, reason=reason)  # pinned by in-flight requests
        return evicted
