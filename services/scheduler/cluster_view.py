"""The scheduler's read/write view of Redis: models, live workers with residency, queues, request records."""

from dataclasses import dataclass

import redis.asyncio as aioredis

from deltazip.cluster.models import MODEL_NAME, MODEL_NAME_RULE, ModelRecord, ModelRegistry
from deltazip.cluster.queues import QueueStats
from deltazip.cluster.requests import RequestLog
from deltazip.cluster.workers import WorkerRegistry
from deltazip.rpc.errors import FailedPrecondition, InvalidArgument, NotFound
from services.scheduler.routing import Candidate


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A servable model: the base, or a registered fine-tune."""

    name: str
    is_base: bool
    record: ModelRecord | None = None
    base_identity: str = ""


class ClusterView:
    """All Redis access of the scheduler goes through here."""

    def __init__(self, redis: aioredis.Redis, base_name: str, rate_tau_s: float, lease_s: float = 10.0):
        self.redis = redis
        self.base_name = base_name
        self.models = ModelRegistry(redis)
        self.workers = WorkerRegistry(redis)
        self.queues = QueueStats(redis, tau_s=rate_tau_s, lease_s=lease_s)
        self.requests = RequestLog(redis)

    async def base(self) -> ResolvedModel | None:
        """The base model: published by workers in dz:base, else --base-name."""
        published = await self.models.base()
        if published is not None:
            return ResolvedModel(published.name, True, base_identity=published.identity)
        return ResolvedModel(self.base_name, True) if self.base_name else None

    async def resolve(self, name: str, record: ModelRecord | None = None) -> ResolvedModel:
        """The model called `name`, or NOT_FOUND telling the caller how to fix it; `record`: its registry entry when
        the caller already read it (one Redis round trip fewer per request)."""
        if not name:
            raise InvalidArgument("model name is empty; name a model (list them with `deltazip models`)")
        record = record if record is not None else await self.models.get(name)
        base = await self.base()
        if record is not None:
            if record.base_identity and base is not None and base.base_identity and record.base_identity != base.base_identity:
                raise FailedPrecondition(
                    f"model {name!r} was compressed against base {record.base_identity[:12]}, but the workers serve "
                    f"{base.name!r} ({base.base_identity[:12]}); compress it again against this base and push it"
                )
            return ResolvedModel(name, False, record, record.base_identity)
        if base is not None and base.name == name:
            return base
        if not MODEL_NAME.fullmatch(name):
            raise InvalidArgument(f"{name!r} is not a valid model name: use {MODEL_NAME_RULE} (list models with "
                                  "`deltazip models`)")
        raise self.not_found(name)

    @staticmethod
    def not_found(name: str) -> NotFound:
        """The one NOT_FOUND for missing models and other tenants' models alike."""
        return NotFound(
            f"model {name!r} is not registered; push it with `deltazip push` or list models with `deltazip models`"
        )

    async def candidates(self, model: str, is_base: bool) -> list[Candidate]:
        """Every live worker with the nearest tier holding `model` and its in-flight count."""
        live = await self.workers.live()
        if not live:
            return []
        ids = [w.worker_id for w in live]
        tiers = {wid: None for wid in ids} if is_base else await self.workers.best_tiers(ids, model)
        inflight = await self.workers.inflight(ids)
        return [Candidate(w, tiers[w.worker_id], inflight[w.worker_id]) for w in live]
