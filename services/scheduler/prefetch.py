"""Prefetch: ask the best-placed workers to load a delta before its requests arrive."""

import asyncio

import grpc

from deltazip.cluster.workers import Tier
from deltazip.logs import get_logger
from deltazip.rpc.channels import ChannelPool
from deltazip.rpc.errors import InvalidArgument, Unavailable
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.scheduler.cluster_view import ClusterView
from services.scheduler.routing import Candidate, rank

log = get_logger("scheduler")

TIER_FROM_PROTO = {
    common_pb2.RESIDENCY_TIER_UNSPECIFIED: Tier.DEVICE,
    common_pb2.RESIDENCY_TIER_DEVICE: Tier.DEVICE,
    common_pb2.RESIDENCY_TIER_HOST: Tier.HOST,
}
_TIER_TO_PROTO = {Tier.DEVICE: common_pb2.RESIDENCY_TIER_DEVICE, Tier.HOST: common_pb2.RESIDENCY_TIER_HOST}


def tier_from_proto(tier: int) -> Tier:
    """DEVICE or HOST; anything else is INVALID_ARGUMENT."""
    if tier not in TIER_FROM_PROTO:
        raise InvalidArgument("prefetch tier must be RESIDENCY_TIER_DEVICE or RESIDENCY_TIER_HOST")
    return TIER_FROM_PROTO[tier]


async def prefetch(view: ClusterView, channels: ChannelPool, model: str, tier: Tier, num_workers: int,
                   affinity_slack: int, timeout_s: float | None) -> list[str]:
    """LoadDelta on the `num_workers` best workers for `model`; returns the ids that loaded it."""
    ranked = rank(await view.candidates(model, is_base=False), affinity_slack, salt=model)
    chosen = ranked[: max(1, num_workers)]
    if not chosen:
        raise Unavailable("no live worker to prefetch to; start one with `python -m services.worker`")
    results = await asyncio.gather(*(_load(channels, c, model, tier, timeout_s) for c in chosen), return_exceptions=True)
    loaded = [c.worker.worker_id for c, r in zip(chosen, results) if r is None]
    errors = [f"{c.worker.worker_id}: {r}" for c, r in zip(chosen, results) if r is not None]
    log.info("prefetched", model=model, tier=tier.value, workers=loaded, errors=errors)
    if not loaded:
        raise Unavailable(f"no worker could load {model!r}: {'; '.join(errors)}")
    return loaded


async def _load(channels: ChannelPool, chosen: Candidate, model: str, tier: Tier, timeout_s: float | None) -> str | None:
    stub = worker_pb2_grpc.WorkerStub(channels.get(chosen.worker.address))
    try:
        await stub.LoadDelta(worker_pb2.LoadDeltaRequest(model=model, tier=_TIER_TO_PROTO[tier]), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return None
