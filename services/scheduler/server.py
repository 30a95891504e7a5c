"""Scheduler servicer: validates, records the request in Redis, and relays a worker's token stream."""

import asyncio
import contextlib

from redis.exceptions import RedisError

from deltazip.cluster.models import ModelRecord
from deltazip.cluster.requests import RequestState
from deltazip import metrics
from deltazip.logs import bind_request, get_logger
from deltazip.rpc.auth import Authenticator
from deltazip.rpc.channels import ChannelPool
from deltazip.rpc.errors import InvalidArgument, ServiceError, rpc_method
from deltazip.security.principal import Principal, Scope, can_see
from deltazip.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.cluster_view import ClusterView, ResolvedModel
from services.scheduler.config import SchedulerConfig
from services.scheduler.prefetch import prefetch, tier_from_proto
from services.scheduler.relay import Placement, QueueLimits, Relay
from services.scheduler.validation import GenerateJob, validate_generate

log = get_logger("scheduler")


def model_info(model: ResolvedModel, base_name: str) -> common_pb2.ModelInfo:
    """A resolved model → proto."""
    if model.is_base:
        return common_pb2.ModelInfo(name=model.name, is_base=True, base=model.name, base_identity=model.base_identity)
    r: ModelRecord = model.record
    return common_pb2.ModelInfo(
        name=r.name, is_base=False, base=r.base or base_name, base_identity=r.base_identity,
        artifact_bytes=r.artifact_bytes, compression_ratio=r.compression_ratio, compression=r.compression,
        created_unix_ms=r.created_unix_ms, tenant=r.tenant, shared=r.shared,
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, view: ClusterView, channels: ChannelPool, config: SchedulerConfig,
                 auth: Authenticator | None = None):
        self.view = view
        self.auth = auth or Authenticator(None)
        self.channels = channels
        self.config = config
        limits = QueueLimits(config.max_queue_per_worker, config.max_queued_tokens_per_worker, config.retry_after_s,
                             config.lease_s, config.worker_check_s)
        self.relay = Relay(view, channels, config.max_attempts, config.affinity_slack, limits)

    async def _resolve_visible(self, principal: Principal, name: str) -> ResolvedModel:
        """The model if `principal` may see it; another tenant's model is NOT_FOUND like a missing one."""
        record, published = await self.view.lookup(name)  # checked first: no other status may hint that it exists
        if record is not None and not can_see(principal, record.ownership()):
            raise self.view.not_found(name)
        return self.view.resolve(name, record, published)

    @rpc_method
    async def Generate(self, request, context):
        principal = self.auth.require(context, Scope.READ, "generating")
        job = validate_generate(request, self.config.max_tokens_limit)
        with bind_request(job.request_id, model=job.model, tenant=principal.tenant):
            model = await self._resolve_visible(principal, job.model)
            earlier, queue = await self.view.accepted(job.request_id, job.model)
            if earlier is not None:  # a client retry (e.g. after a scheduler died): same id, next attempt number
                log.info("request_retried", earlier_state=earlier.state, attempts=earlier.attempts)
            log.info("request_accepted", pending=queue.pending, rate_per_s=round(queue.rate_per_s, 3))
            metrics.QUEUE_DEPTH.labels("scheduler", job.model).inc()  # this replica's requests, waiting or running
            timer = metrics.StreamTimer("scheduler")
            state, error = RequestState.FAILED, ""
            placement = Placement()
            try:
                # closed on the way out, whatever ends the stream (the client going away mid-write included), so the
                # relay has set `placement` before _finish gives that queue place back
                async with contextlib.aclosing(self.relay.generate(job, model.is_base, context.time_remaining,
                                                                   placement)) as chunks:
                    async for chunk in chunks:
                        timer.add(len(chunk.token_ids))
                        yield chunk
                state = RequestState.FINISHED
            except ServiceError as exc:
                error = f"{exc.code.name}: {exc.message}"
                raise
            except (asyncio.CancelledError, GeneratorExit):  # client went away (mid-read or mid-write)
                state = RequestState.CANCELLED
                raise
            finally:
                timer.finish()
                metrics.QUEUE_DEPTH.labels("scheduler", job.model).dec()
                await asyncio.shield(self._finish(job, state, error, placement.worker_id))

    async def _finish(self, job: GenerateJob, state: RequestState, error: str, release_from: str) -> None:
        log.info("request_finished", state=state.value, error=error)
        try:  # bookkeeping only: a stream that was relayed whole must not end UNAVAILABLE because Redis went away
            await self.view.ended(job.request_id, job.model, state, error, release_from)
        except (RedisError, OSError) as exc:  # the record expires with its TTL, the queue entry with its lease
            log.warning("request_record_not_updated", state=state.value, error=str(exc))

    @rpc_method
    async def ListModels(self, request, context):
        principal = self.auth.require(context, Scope.READ, "listing models")
        base = await self.view.base()
        base_name = base.name if base else ""
        infos = [model_info(base, base_name)] if base else []
        infos += [model_info(ResolvedModel(r.name, False, r, r.base_identity), base_name)
                  for r in await self.view.models.list() if can_see(principal, r.ownership())]
        return scheduler_pb2.ListModelsResponse(models=infos)

    @rpc_method
    async def GetModel(self, request, context):
        principal = self.auth.require(context, Scope.READ, "reading a model")
        model = await self._resolve_visible(principal, request.name)
        base = await self.view.base()
        return model_info(model, base.name if base else "")

    @rpc_method
    async def Prefetch(self, request, context):
        principal = self.auth.require(context, Scope.WRITE, "prefetching a model")
        tier = tier_from_proto(request.tier)
        model = await self._resolve_visible(principal, request.model)
        if model.is_base:
            raise InvalidArgument(f"{request.model!r} is the base model, which every worker always holds")
        remaining = context.time_remaining()
        timeout_s = self.config.prefetch_timeout_s if remaining is None else min(remaining, self.config.prefetch_timeout_s)
        worker_ids = await prefetch(self.view, self.channels, request.model, tier, request.num_workers,
                                    self.config.affinity_slack, timeout_s)
        return scheduler_pb2.PrefetchResponse(worker_ids=worker_ids)
