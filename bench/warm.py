"""Warm state of a serving point set: its fine-tunes prefetched into the strongest tier the worker's mode keeps.

What each mode is warmed to (the most popular fine-tunes first, as far as the worker's own budgets hold them):
- `delta`, `dense-delta`: GPU slots for the `--num-device-slots` most popular (fewer when `--device-cache-bytes`
  binds), the host cache for the next ones (`--host-cache-bytes`; slot holders keep their host copy, tiers are
  inclusive). dense-delta's host copies are fp16, so fewer of them fit than packed deltas.
- `swap`: the pinned host cache, holding each fine-tune's merged weights. "On device" in swap mode only means
  "may be swapped in next" (no bytes held), so host is the strongest tier a swap worker keeps many models in.
What does not fit stays where it is (the worker's disk cache when an earlier mode fetched it, else the store); the
record lists it, and the worker's residency after the prefetch says where every fine-tune of the set ended up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

WARM_TIERS = {"delta": ("device", "host"), "dense-delta": ("device", "host"), "swap": ("host",)}
MAX_CONCURRENT = 4  # prefetches in flight: the worker's residency pool moves 4 deltas at once
REGISTER_WAIT_S = 15.0  # a worker answers health checks a moment before the scheduler can see it in Redis


@dataclass(frozen=True, slots=True)
class TierBudget:
    """The slot and byte budgets a worker was started with."""

    num_device_slots: int
    device_cache_bytes: int  # 0 = limited by slots only
    host_cache_bytes: int

    @classmethod
    def of_worker(cls, base_dir: str, flags: list[str]) -> TierBudget:
        """Read from the worker's flags by the worker's own parser (same defaults, same DELTAZIP_* env)."""
        from services.worker.config import config_from_args

        config = config_from_args(["--base-dir", base_dir, *flags])
        return cls(config.num_device_slots, config.device_cache_bytes, config.host_cache_bytes)


def plan(names: list[str], mode: str, budget: TierBudget, model_bytes: int) -> dict[str, str]:
    """{name: 'device' | 'host'} for the fine-tunes that fit, `names` most popular first; `model_bytes` is what one
    takes in the host tier (0 = unknown: plan them all)."""
    num_host = len(names) if model_bytes <= 0 else min(len(names), max(1, budget.host_cache_bytes // model_bytes))
    num_device = 0
    if "device" in WARM_TIERS[mode]:
        num_device = min(budget.num_device_slots, num_host)
        if budget.device_cache_bytes and model_bytes > 0:
            num_device = min(num_device, budget.device_cache_bytes // model_bytes)
    return {name: "device" if i < num_device else "host" for i, name in enumerate(names[:num_host])}


async def residency(worker_address: str) -> dict[str, tuple[str, int]]:
    """{model: (tier, bytes in that tier)} for every delta the worker holds locally (its Status)."""
    from deltazip.rpc.channels import aio_channel
    from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    names = {common_pb2.RESIDENCY_TIER_DEVICE: "device", common_pb2.RESIDENCY_TIER_HOST: "host",
             common_pb2.RESIDENCY_TIER_DISK: "disk"}
    async with aio_channel(worker_address) as channel:
        reply = await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)
    return {d.model: (names.get(d.tier, "remote"), d.bytes) for d in reply.deltas}


async def warm_residency(scheduler: str, worker_address: str, mode: str, names: list[str], budget: TierBudget,
                         timeout_s: float) -> dict:
    """Prefetch `names` (most popular first) through the SDK into the tiers `plan` gives; the record of it."""
    from deltazip.client import AsyncClient, DeltaZipError, UnavailableError

    start = time.monotonic()
    failed: dict[str, str] = {}
    async with AsyncClient(scheduler, timeout_s=timeout_s) as client:
        async def one(name: str, tier: str) -> Exception | None:
            """Prefetch `name` to `tier`; the error (also recorded in `failed`), or None once it is there."""
            left_s = start + timeout_s - time.monotonic()
            try:
                if left_s <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(client.prefetch(name, tier=tier, num_workers=1), left_s)
            except asyncio.TimeoutError as exc:
                failed[name] = f"not done within --warmup-prefetch-timeout-s {timeout_s:.0f}"
                return exc
            except DeltaZipError as exc:
                failed[name] = str(exc)[:300]
                return exc
            failed.pop(name, None)
            return None

        # The most popular one alone first: what one fine-tune takes in this mode's host tier sizes the plan. A
        # worker answers health checks a moment before the scheduler sees it in Redis: retry while none is live.
        while (isinstance(await one(names[0], "host"), UnavailableError)
               and time.monotonic() - start < REGISTER_WAIT_S):
            await asyncio.sleep(0.2)
        model_bytes = (await residency(worker_address)).get(names[0], ("", 0))[1]
        # Without that size there is no plan: prefetching everything could only evict and reload.
        targets = {} if names[0] in failed else plan(names, mode, budget, model_bytes)
        # Host group, then device group, least popular first in each: the most popular are used last (LRU).
        order = sorted(targets, key=lambda n: (targets[n] == "device", -names.index(n)))
        slots = asyncio.Semaphore(MAX_CONCURRENT)

        async def limited(name: str) -> None:
            async with slots:
                await one(name, targets[name])

        await asyncio.gather(*(limited(name) for name in order))
    held = await residency(worker_address)
    return record(mode, names, targets, failed, held, budget, model_bytes, time.monotonic() - start)


def record(mode: str, names: list[str], targets: dict[str, str], failed: dict[str, str],
           held: dict[str, tuple[str, int]], budget: TierBudget, model_bytes: int, seconds: float) -> dict:
    """The warmups entry's `prefetch`: what was planned where, what got there, what did not fit or failed."""
    rank = ("device", "host", "disk", "remote")
    tiers = {name: held.get(name, ("remote", 0))[0] for name in names}
    return {
        "warmed_to": list(WARM_TIERS[mode]), "num_models": len(names), "seconds": round(seconds, 2),
        "planned": {tier: sum(t == tier for t in targets.values()) for tier in WARM_TIERS[mode]},
        "prefetched": sum(name not in failed for name in targets), "model_host_bytes": model_bytes,
        "budget": asdict(budget), "resident": {tier: sum(t == tier for t in tiers.values()) for tier in rank},
        "did_not_fit": [name for name in names if name not in targets] if targets else [],
        "failed": failed,
        "not_in_planned_tier": {name: tiers[name] for name, tier in targets.items()
                                if name not in failed and rank.index(tiers[name]) > rank.index(tier)},
    }
