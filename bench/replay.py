"""Open-loop replay of a workload through the async SDK, and the serving metrics computed from what it saw.

Per request (client side, from its scheduled arrival): TTFT, time per output token, end-to-end latency; per run:
throughput over the busy span, percentiles, SLO attainment against a base-only run of the same requests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from bench.workload import Request
from services.worker.engine.step_profile import phase_deltas, segment_deltas


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request saw, client side; times in ms from its scheduled arrival."""

    id: str
    model: str
    ok: bool
    arrival_s: float
    lag_ms: float  # how late the driver sent it (should stay ~0: open loop)
    ttft_ms: float
    e2e_ms: float
    num_tokens: int
    server_queue_ms: float
    server_ttft_ms: float
    error: str = ""

    @property
    def tpot_ms(self) -> float:
        return (self.e2e_ms - self.ttft_ms) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0


async def send_one(client, request: Request, start: float, timeout_s: float, request_id: str | None = None) -> Outcome:
    """Stream one request; TTFT at the first chunk carrying tokens. `request_id` None = the scheduler picks one."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    first, num_tokens, usage = None, 0, None
    try:
        async for token in client.stream(request.model, request.prompt, request_id=request_id, timeout_s=timeout_s,
                                         max_tokens=request.max_tokens, min_tokens=request.min_tokens or None,
                                         temperature=0.0, ignore_eos=True):
            if token.token_ids and first is None:
                first = loop.time()
            num_tokens += len(token.token_ids)
            usage = token.usage or usage
        error = ""
    except Exception as exc:  # noqa: BLE001  (any failure is a failed request in the results, not a crash)
        error = f"{type(exc).__name__}: {exc}"[:300]
    end = loop.time()
    arrival = start + request.timestamp
    first = first or end
    return Outcome(request.id, request.model, not error and num_tokens > 0, request.timestamp, 1e3 * (sent - arrival),
                   1e3 * (first - arrival), 1e3 * (end - arrival), num_tokens,
                   usage.queue_ms if usage else 0.0, usage.ttft_ms if usage else 0.0, error)


async def sample_worker(address: str, stop: asyncio.Event, period_s: float = 0.1) -> dict:
    """Poll the worker's Status while a run lasts: how full its batches are, how many requests wait, where its
    step time went (`worker_phases`), how its steps' delta rows split into segments (`worker_delta_segments`:
    {step kind: {row bin: [segments, rows]}}, docs/serving.md) and, where it keeps merged weights, what its cache did
    (`worker_merged_cache`: hits, builds and evictions during the run, slots and bytes kept at its end; None: off)."""
    from deltazip.rpc.channels import aio_channel
    from deltazip.v1 import worker_pb2, worker_pb2_grpc

    running, waiting, phases = [], [], []  # phases: (monotonic time, {phase: (count, seconds)}) first and last
    segments = []  # {(step kind, row bin): (segments, rows)}, first and last
    cache = []  # the merged cache's counters, first and last
    async with aio_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        while True:
            reply = await stub.Status(worker_pb2.StatusRequest(), timeout=5)
            running.append(reply.num_running)
            waiting.append(reply.num_waiting)
            phases[1:] = [(time.monotonic(), {p.name: (p.count, p.seconds) for p in reply.step_phases})]
            segments[1:] = [{(b.step, b.min_rows): (b.segments, b.rows) for b in reply.delta_segments}]
            if reply.HasField("merged_cache"):
                cache[1:] = [reply.merged_cache]
            if stop.is_set():  # one read after the run ended closes the profile's interval
                break
            try:
                await asyncio.wait_for(stop.wait(), period_s)
            except asyncio.TimeoutError:
                pass
    (t0, before), (t1, after) = phases[0], phases[-1]
    return {"worker_running_mean": float(np.mean(running)) if running else float("nan"),
            "worker_waiting_mean": float(np.mean(waiting)) if waiting else float("nan"),
            "worker_waiting_max": int(max(waiting, default=0)),
            "worker_phases": phase_deltas(before, after, t1 - t0),
            "worker_delta_segments": segment_deltas(segments[0], segments[-1]),
            "worker_merged_cache": merged_cache_deltas(cache[0], cache[-1]) if cache else None}


def merged_cache_deltas(before, after) -> dict:
    """A run's merged-cache counters from its first and last Status reads (worker_pb2.MergedCacheStats): what
    happened in between, and what was kept at the end."""
    return {"hits": after.hits - before.hits, "builds": after.builds - before.builds,
            "evictions": after.evictions - before.evictions, "slots": after.slots, "used_bytes": after.used_bytes,
            "budget_bytes": after.budget_bytes}


class _NoBar:
    def __init__(self, *args, **kwargs): ...
    def __enter__(self): return self
    def __exit__(self, *exc): ...
    def update(self, n: int) -> None: ...


async def replay(address: str, requests: list[Request], timeout_s: float, desc: str,
                 worker_address: str | None = None, *, id_prefix: str | None = None, start_at: float | None = None,
                 on_done=None) -> tuple[list[Outcome], float, dict]:
    """Send every request at its timestamp (open loop, real concurrency); returns outcomes, wall time (s) and
    the worker's sampled queue state (when `worker_address` is given).

    `id_prefix`: send `<prefix><request.id>` as the request id (unique per run: a reused id is a retry);
    `start_at`: time.monotonic() of timestamp 0 (clients in several processes share one clock); `on_done`:
    called once per finished request instead of drawing a progress bar."""
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU image: no progress bar
        tqdm = _NoBar
    if on_done is not None:
        tqdm = _NoBar

    from deltazip.client import AsyncClient

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_worker(worker_address, stop)) if worker_address else None
    async with AsyncClient(address, timeout_s=timeout_s) as client:
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False) as bar:
            start = loop.time() + 0.05 if start_at is None else start_at  # loop.time() is time.monotonic()
            tasks = []
            for request in requests:
                delay = start + request.timestamp - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                request_id = None if id_prefix is None else id_prefix + request.id
                task = asyncio.create_task(send_one(client, request, start, timeout_s, request_id))
                task.add_done_callback((lambda _: on_done()) if on_done is not None else (lambda _: bar.update(1)))
                tasks.append(task)
            outcomes = await asyncio.gather(*tasks)
    wall_s = loop.time() - start
    stop.set()
    return list(outcomes), wall_s, (await sampler if sampler else {})


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(outcomes: list[Outcome], wall_s: float, base: dict[str, Outcome] | None, slo_k: float) -> dict:
    """One result row's measured fields: throughput, latency percentiles, SLO attainment vs the base-only run."""
    done = [o for o in outcomes if o.ok]
    span_s = max([o.arrival_s + o.e2e_ms / 1e3 for o in outcomes] + [1e-9])  # first arrival to last finish
    ttft, e2e, tpot = [o.ttft_ms for o in done], [o.e2e_ms for o in done], [o.tpot_ms for o in done if o.num_tokens > 1]
    row = {
        "num_requests": len(outcomes), "num_failed": len(outcomes) - len(done),
        "throughput_rps": len(done) / span_s, "tokens_per_s": sum(o.num_tokens for o in done) / span_s,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90), "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p90_ms": percentile(tpot, 90),
        "e2e_p50_ms": percentile(e2e, 50), "e2e_p90_ms": percentile(e2e, 90), "e2e_p99_ms": percentile(e2e, 99),
        "server_queue_mean_ms": float(np.mean([o.server_queue_ms for o in done])) if done else float("nan"),
        "server_ttft_mean_ms": float(np.mean([o.server_ttft_ms for o in done])) if done else float("nan"),
        "send_lag_p99_ms": percentile([o.lag_ms for o in outcomes], 99), "wall_s": wall_s,
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
    }
    if base is not None:
        met = [o.ok and o.id in base and base[o.id].ok and o.e2e_ms <= slo_k * base[o.id].e2e_ms for o in outcomes]
        row["slo_attainment"] = sum(met) / len(outcomes) if outcomes else float("nan")
        base_ttft = [b.ttft_ms for b in base.values() if b.ok]
        row["ttft_p90_vs_base"] = row["ttft_p90_ms"] / percentile(base_ttft, 90) if base_ttft else float("nan")
    return row


def add_ratios(rows: list[dict]) -> None:
    """throughput_vs_swap / throughput_vs_dense: each row against the baseline row of the same point."""
    def key(r):
        return (r.get("bits"), r["num_models"], r["load"])

    by_mode = {(r["mode"], *key(r)): r for r in rows}
    for r in rows:
        for name, mode in (("throughput_vs_swap", "swap"), ("throughput_vs_dense", "dense-delta")):
            ref = by_mode.get((mode, *key(r)))
            r[name] = r["throughput_rps"] / ref["throughput_rps"] if ref and ref["throughput_rps"] > 0 else None


def goal_summary(rows: list[dict], num_models: int = 32) -> dict:
    """Issue 7's goals read off the rows: at `num_models` (else the largest measured) and the highest load, per bits:
    throughput vs swap, TTFT p90 vs base-only, and whether delta's SLO attainment beats both baselines at every load."""
    counts = sorted({r["num_models"] for r in rows if r["num_models"]})
    if not counts:
        return {}
    n = num_models if num_models in counts else counts[-1]
    top = max(r["load"] for r in rows)
    summary = {"num_models": n, "load": top}
    for bits in sorted({r["bits"] for r in rows if r["mode"] == "delta" and r["bits"] is not None}):
        delta = {r["load"]: r for r in rows if r["mode"] == "delta" and r["bits"] == bits and r["num_models"] == n}
        if top not in delta:
            continue
        beats = {}
        for mode in ("swap", "dense-delta"):
            ref = {r["load"]: r for r in rows if r["mode"] == mode and r["bits"] == bits and r["num_models"] == n}
            if ref:
                beats[mode] = all(d.get("slo_attainment", 0) >= ref[load].get("slo_attainment", 0)
                                  for load, d in delta.items() if load in ref)
        summary[f"{bits}bit"] = {
            "throughput_vs_swap": delta[top].get("throughput_vs_swap"),
            "throughput_vs_dense": delta[top].get("throughput_vs_dense"),
            "ttft_p90_vs_base": delta[top].get("ttft_p90_vs_base"),
            "slo_at_least_baseline_at_every_load": beats,
            "goal_throughput_vs_swap_15x": _at_least(delta[top].get("throughput_vs_swap"), 15.0),
            "goal_ttft_p90_within_2x_base": _at_least(2.0, delta[top].get("ttft_p90_vs_base")),
        }
    return summary


def _at_least(a: float | None, b: float | None) -> bool | None:
    """a >= b, or None when either was not measured (a goal without its baseline is not failed, it is open)."""
    return None if a is None or b is None else a >= b
