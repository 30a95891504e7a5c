"""Choosing a worker: delta already on the worker's device > on its host > least loaded (requests, queued
tokens, then free KV share).

Affinity wins only while the holder is not much busier than the idlest worker (`affinity_slack` requests),
so one popular model cannot pile every request onto one worker.
"""

import zlib
from dataclasses import dataclass

from deltazip.cluster.workers import Tier, WorkerRecord

_TIER_RANK = {Tier.DEVICE: 0, Tier.HOST: 1, Tier.DISK: 2, None: 3}


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live worker as seen for one model."""

    worker: WorkerRecord
    tier: Tier | None  # nearest tier holding the model; None = must fetch from the store
    inflight: int = 0  # requests all schedulers are relaying to it right now

    @property
    def load(self) -> int:
        """Requests on the worker: its own count, or the schedulers' fresher count if larger."""
        return max(self.inflight, self.worker.num_running + self.worker.num_waiting)

    @property
    def free_kv_fraction(self) -> float:
        """Share of the worker's KV blocks free (1.0 when it has not published them)."""
        total = self.worker.total_kv_blocks
        return self.worker.free_kv_blocks / total if total else 1.0


def rank(candidates: list[Candidate], affinity_slack: int, salt: str = "") -> list[Candidate]:
    """Candidates best first; `salt` (the request id) breaks exact ties differently per request."""
    if not candidates:
        return []
    least = min(c.load for c in candidates)

    def key(c: Candidate) -> tuple:
        near = c.load <= least + affinity_slack
        tie = zlib.crc32(f"{salt}/{c.worker.worker_id}".encode())
        return (not near, _TIER_RANK[c.tier] if near else 0, c.load, c.worker.queued_tokens, -c.free_kv_fraction, tie)

    return sorted(candidates, key=key)
