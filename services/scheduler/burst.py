"""Burst prefetch: watch per-model arrival rates in Redis and load a bursting model's delta onto more workers.

Stateless: every decision reads Redis, and a lease (`dz:prefetch:<model>`, SET NX PX) makes one scheduler
of N act on a model per window. Holders wanted = arrival rate / what one worker absorbs; the best-ranked
non-holders get `LoadDelta` before the burst's requests reach them, evicting their coldest delta first.
"""

import asyncio
import math
from dataclasses import dataclass

from redis.exceptions import RedisError

from deltazip.cluster import keys
from deltazip.cluster.queues import QueueState
from deltazip.cluster.workers import Tier
from deltazip.logs import get_logger
from deltazip.rpc.channels import ChannelPool
from services.scheduler.cluster_view import ClusterView, candidates_in
from services.scheduler.prefetch import load_on
from services.scheduler.routing import Candidate, rank

log = get_logger("scheduler")


@dataclass(frozen=True, slots=True)
class BurstPolicy:
    interval_s: float = 0.5  # detector period
    burst_rate_per_s: float = 2.0  # arrivals/s that count as a burst
    burst_pending: int = 8  # or requests routed but not started
    rate_per_worker: float = 4.0  # arrivals/s one worker absorbs
    window_s: float = 5.0  # one decision per model per window (lease TTL)
    tier: Tier = Tier.DEVICE
    timeout_s: float = 120.0


def holders_wanted(q: QueueState, policy: BurstPolicy, num_live: int) -> int:
    """0 when `q` is not bursting, else how many workers should hold the model (at most `num_live`)."""
    if q.rate_per_s < policy.burst_rate_per_s and (not policy.burst_pending or q.pending < policy.burst_pending):
        return 0
    by_rate = math.ceil(q.rate_per_s / policy.rate_per_worker)
    by_queue = math.ceil(q.pending / policy.burst_pending) if policy.burst_pending else 0
    return min(num_live, max(1, by_rate, by_queue))


def pick_targets(candidates: list[Candidate], tier: Tier, wanted: int, affinity_slack: int, model: str) -> list[Candidate]:
    """The best-ranked workers not yet holding the model in `tier` (or nearer), enough to reach `wanted`."""
    holders = [c for c in candidates if c.tier is not None and _nearer(c.tier, tier)]
    missing = wanted - len(holders)
    if missing <= 0:
        return []
    others = [c for c in candidates if c not in holders]
    return rank(others, affinity_slack, salt=model)[:missing]


def _nearer(have: Tier, want: Tier) -> bool:
    order = [Tier.DEVICE, Tier.HOST, Tier.DISK]
    return order.index(have) <= order.index(want)


class BurstPrefetcher:
    """The detector loop of one scheduler replica."""

    def __init__(self, view: ClusterView, channels: ChannelPool, policy: BurstPolicy, scheduler_id: str,
                 affinity_slack: int):
        self.view = view
        self.channels = channels
        self.policy = policy
        self.scheduler_id = scheduler_id
        self.affinity_slack = affinity_slack
        self._loads: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Check every `interval_s` until `stop`; a Redis outage is logged and retried."""
        while not stop.is_set():
            try:
                await self.check()
            except (RedisError, OSError) as exc:
                log.warning("burst_check_failed", error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.policy.interval_s)
            except TimeoutError:
                pass
        for task in list(self._loads):
            task.cancel()

    async def check(self) -> list[tuple[str, list[str]]]:
        """One detector pass; returns (model, target worker ids) for each prefetch it started."""
        queues = await self.view.queues.active()
        if not queues:
            return []
        base = await self.view.base()
        num_ids = len(await self.view.worker_ids())
        # every worker always holds the base; one snapshot (one round trip) for all models that may be bursting
        maybe = [q for q in queues if holders_wanted(q, self.policy, num_ids) and (base is None or q.model != base.name)]
        if not maybe:
            return []
        snap = await self.view.snapshot([q.model for q in maybe])
        rates = {q.model: q.rate_per_s for q in queues}
        started = []
        for q in maybe:
            wanted = holders_wanted(q, self.policy, len(snap.records))
            if not wanted:
                continue
            candidates = candidates_in(snap, q.model, is_base=False)
            targets = pick_targets(candidates, self.policy.tier, wanted, self.affinity_slack, q.model)
            if not targets or not await self._lease(q.model):
                continue
            log.info("burst_detected", model=q.model, rate_per_s=round(q.rate_per_s, 2), pending=q.pending,
                     wanted=wanted, targets=[t.worker.worker_id for t in targets])
            for target in targets:
                task = asyncio.create_task(load_on(self.view, self.channels, target, q.model, self.policy.tier,
                                                   rates, self.policy.timeout_s))
                self._loads.add(task)
                task.add_done_callback(self._loads.discard)
            started.append((q.model, [t.worker.worker_id for t in targets]))
        return started

    async def _lease(self, model: str) -> bool:
        """True if this scheduler now holds the model's prefetch lease for one window."""
        window_ms = int(self.policy.window_s * 1000)
        return bool(await self.view.redis.set(keys.prefetch_lease(model), self.scheduler_id, nx=True, px=window_ms))
