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
    """Owns no deltas: asks the ResidencyManager (their owner) to evict stale ones."""

    def __init__(self, registry: ModelRegistry, residency: ResidencyManager, interval_s: float = 1.0):
        self.registry = registry
        self.residency = residency
        self.interval_s = interval_s
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (created_unix_ms, artifact_bytes) when first held

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
        held = [d.name for d in self.residency.snapshot() if d.tier is not Tier.REMOTE]
        if not held:
            return []
        current = {r.name: (r.created_unix_ms, r.artifact_bytes) for r in await self.registry.list()}
        evicted = []
        for name in held:
            version = current.get(name)
            first = self._seen.setdefault(name, version) if version is not None else None
            if version is not None and version == first:
                continue
            reason = "deleted" if version is None else "overwritten"
            if self.residency.evict(name, Tier.DISK):
                self._seen.pop(name, None)
                evicted.append(name)
                log.info("delta_dropped", model=name, reason=reason)
            else:
                log.debug("delta_drop_waits", model=name, reason=reason)  # pinned by in-flight requests
        return evicted
