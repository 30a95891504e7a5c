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
    rates = {q.model: q.rate_per_s for q in await view.queues.active()}
    results = await asyncio.gather(*(load_on(view, channels, c, model, tier, rates, timeout_s) for c in chosen))
    loaded = [c.worker.worker_id for c, r in zip(chosen, results) if r is None]
    errors = [f"{c.worker.worker_id}: {r}" for c, r in zip(chosen, results) if r is not None]
    if not loaded:
        raise Unavailable(f"no worker could load {model!r}: {'; '.join(errors)}")
    return loaded


async def load_on(view: ClusterView, channels: ChannelPool, chosen: Candidate, model: str, tier: Tier,
                  rates: dict[str, float], timeout_s: float | None) -> str | None:
    """Make room by evicting the worker's coldest delta if its slots are full, then LoadDelta; None = loaded."""
    stub = worker_pb2_grpc.WorkerStub(channels.get(chosen.worker.address))
    wid = chosen.worker.worker_id
    try:
        if tier is Tier.DEVICE:
            victim = await cold_victim(view, chosen, model, rates)
            if victim is not None:
                reply = await stub.EvictDelta(worker_pb2.EvictDeltaRequest(model=victim, tier=_TIER_TO_PROTO[Tier.DEVICE]),
                                              timeout=timeout_s)
                log.info("cold_delta_evicted", worker=wid, model=victim, evicted=reply.evicted, for_model=model)
        reply = await stub.LoadDelta(worker_pb2.LoadDeltaRequest(model=model, tier=_TIER_TO_PROTO[tier]), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        log.warning("prefetch_failed", worker=wid, model=model, code=exc.code().name, message=exc.details())
        return f"{exc.code().name}: {exc.details()}"
    log.info("prefetched", worker=wid, model=model, tier=tier.value, load_ms=round(reply.load_ms, 1))
    return None


async def cold_victim(view: ClusterView, chosen: Candidate, model: str, rates: dict[str, float]) -> str | None:
    """The device-resident delta with the lowest arrival rate, when the worker's slots are all taken.

    None when a slot is free, the slot count is unknown, or every resident is at least as hot as `model`
    (a prefetch never pushes out a hotter model).
    """
    slots = chosen.worker.num_device_slots
    resident = (await view.workers.residency(chosen.worker.worker_id))[Tier.DEVICE]  # LRU first
    resident = [m for m in resident if m != model]
    if not slots or len(resident) < slots:
        return None
    coldest = min(resident, key=lambda m: rates.get(m, 0.0))  # min keeps LRU order among equal rates
    return coldest if rates.get(coldest, 0.0) < rates.get(model, 0.0) else None
