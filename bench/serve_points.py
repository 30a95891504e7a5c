"""The points of a serving run (bench/serve.py): per worker mode the base-only reference, the warm-up, every
num_models x load point replayed open-loop, and the calibration burst; results appended as rows."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable

from bench.replay import Outcome, replay, sample_worker, summarize
from bench.split_replay import split_replay
from bench.workload import Request, WorkloadConfig, generate, map_trace_models, read_trace, scaled, with_model

BASE_MODE = "base"  # the base model alone, served by the `delta` worker: the SLO reference


def workload(args: argparse.Namespace, models: tuple[str, ...]) -> list[Request]:
    """The requests at load 1 over `models` (the most popular first)."""
    if args.trace:
        return map_trace_models(read_trace(args.trace), models)
    cfg = WorkloadConfig(models, args.num_requests, args.rate_rps, args.arrival, args.cv, args.zipf_alpha,
                         args.prompt_len, 4 * args.prompt_len, args.output_len, 4 * args.output_len, args.seed)
    return generate(cfg)


def send(address: str, requests: list[Request], args, desc: str, worker_address: str | None = None,
         timeout_s: float = 0.0):
    """Replay in this process, or from --client-procs processes over the comma-listed schedulers in `address`;
    each request's deadline is `timeout_s` (0 = --timeout-s)."""
    addresses = address.split(",")
    timeout_s = timeout_s or args.timeout_s
    if args.client_procs == 1 and len(addresses) == 1:
        return asyncio.run(replay(address, requests, timeout_s, desc, worker_address))
    args.num_sends = getattr(args, "num_sends", 0) + 1  # request ids unique per replay: a reused id is a retry
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = threading.Event()
        sampled = pool.submit(asyncio.run, _sample_until(worker_address, done)) if worker_address else None
        try:
            outcomes, wall_s, clients = split_replay(addresses, requests, timeout_s, desc,
                                                     max(args.client_procs, len(addresses)), f"s{args.num_sends}-")
        finally:
            done.set()
        queue = sampled.result() if sampled else {}
    return outcomes, wall_s, {**queue, "client_cpu_s": clients["client_cpu_s"]}


async def _sample_until(worker_address: str, done: threading.Event) -> dict:
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_worker(worker_address, stop))
    while not done.is_set():
        await asyncio.sleep(0.1)
    stop.set()
    return await sampler


def mark(args, event: str, **fields) -> None:
    """One timeline entry (seconds since the run started): where a run's time went, in the JSON and the log."""
    entry = {"event": event, "at_s": round(args.budget.elapsed_s(), 1), **fields}
    args.timeline.append(entry)
    print(f"[{entry['at_s']:.0f} s] {event} " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def run_point(address: str, requests: list[Request], args, point: dict, base: dict | None, rows: list,
              latencies: list, worker_address: str | None = None, first_of_mode: bool = True) -> list[Outcome]:
    """Replay one (mode, bits, num_models, load) point and append its row and latency samples."""
    why = args.budget.why_skip(first_of_mode)
    if why:
        print(f"{why}: point {point} skipped", flush=True)
        args.over_budget.append({**point, "why": why})
        return []
    if args.trace:  # a trace has its own rate: report what it offers at this load
        point["rate_rps"] = round(len(requests) / max(requests[-1].timestamp, 1e-9), 3)
    desc = " ".join(f"{k}={v}" for k, v in point.items())
    outcomes, wall_s, queue = send(address, requests, args, desc, worker_address)
    span_s = max(requests[-1].timestamp, 1e-9)
    row = {**point, "offered_rps": len(requests) / span_s, **summarize(outcomes, wall_s, base, args.slo_k), **queue}
    rows.append(row)
    latencies.append({**point, "e2e_ms": sorted(round(o.e2e_ms, 2) for o in outcomes if o.ok),
                      "ttft_ms": sorted(round(o.ttft_ms, 2) for o in outcomes if o.ok)})
    print(f"{desc}: {row['throughput_rps']:.2f} req/s, ttft p90 {row['ttft_p90_ms']:.0f} ms, "
          f"e2e p99 {row['e2e_p99_ms']:.0f} ms, slo {row.get('slo_attainment', float('nan')):.2f}, "
          f"failed {row['num_failed']}", flush=True)
    if row.get("worker_phases"):
        print("  worker time: " + ", ".join(f"{name} {p['share']:.0%} ({p['count']} x {p['mean_ms']:.1f} ms)" for name, p
                                            in sorted(row["worker_phases"].items(), key=lambda kv: -kv[1]["seconds"])),
              flush=True)
    for step, bins in (row.get("worker_delta_segments") or {}).items():  # {bin: [segments, rows]}
        print(f"  {step} delta segments by rows: "
              + ", ".join(f"{low}+ {n} ({r} rows)" for low, (n, r) in bins.items()), flush=True)
    args.budget.last_point_s = wall_s
    mark(args, "point", **{k: v for k, v in point.items() if k != "rate_rps"}, wall_s=round(wall_s, 1))
    if args.checkpoint is not None:
        args.checkpoint()  # partial results survive a kill at the call's time limit
    return outcomes


def warm_up(address: str, mode: str, bits: int | None, names: list[str], reqs: list[Request], args,
            prefetch: Callable[[list[str]], dict] | None, worker_address: str | None = None) -> None:
    """Before a point set: its fine-tunes prefetched (--warmup-prefetch), the worker's kernel warm-up waited for
    (--warmup-settle-s), then its first requests replayed unrecorded (--warmup-requests), and the warm-up waited
    for again: steady state, popular deltas resident and kernels built. With the worker's
    address, the entry keeps the worker's kernel warm-up and in-step compile totals so far (`worker_kernels`:
    the step profile's `warmup` and `compile` phases, services/worker/engine/step_profile.py)."""
    if args.budget.remaining_s() <= 0:
        return
    entry = {"mode": mode, "bits": bits, "num_models": len(names)}
    if prefetch is not None:
        entry["prefetch"] = done = prefetch(names)
        mark(args, "prefetched", mode=mode, warmed_to="+".join(done["warmed_to"]), **done["resident"],
             did_not_fit=len(done["did_not_fit"]), failed=len(done["failed"]), seconds=done["seconds"])
    settle = worker_address and getattr(args, "warmup_settle_s", 0) > 0

    def wait_for_kernels(key: str, **fields) -> None:
        limit_s = min(args.warmup_settle_s, max(args.budget.remaining_s(), 0.0))
        entry[key] = got = settle_kernels(worker_address, limit_s)
        mark(args, "kernels settled", mode=mode, **fields, **got)

    if settle and args.warmup_requests:  # kernels first, so the warm-up requests run on a built worker
        wait_for_kernels("settle_before", before="requests")
    if args.warmup_requests:
        warm = [dataclasses.replace(r, id=f"warm-{r.id}") for r in reqs[:args.warmup_requests]]
        outcomes, _, _ = send(address, warm, args, f"warm-up mode={mode} bits={bits} num_models={len(names)}",
                              timeout_s=args.warmup_timeout_s)
        entry.update(requests=len(warm), completed=sum(o.ok for o in outcomes))
        mark(args, "warm-up", mode=mode, requests=len(warm), completed=entry["completed"])
    if settle:  # again: the requests may have loaded deltas whose stacks need kernels of their own
        wait_for_kernels("settle")
    if worker_address:
        try:
            entry["worker_kernels"] = kernels = asyncio.run(_kernel_phases(worker_address))
        except Exception as exc:  # a report, not a step of the run: the points still run
            entry["worker_kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        else:
            mark(args, "kernels", mode=mode, **{f"{name}_{key}": value for name, phase in kernels.items()
                                                for key, value in phase.items()})
    if len(entry) > 3:
        args.warmups.append(entry)


SETTLE_POLL_S = 0.5
SETTLE_CLEAR_POLLS = 2  # consecutive Status replies saying no warm-up is left


def settle_kernels(worker_address: str, limit_s: float) -> dict:
    """Wait (at most limit_s) until the worker says no kernel warm-up work is left (Status.kernels_warming false on
    SETTLE_CLEAR_POLLS replies in a row): an idle worker builds what is left (GEMM row buckets, SBMM variants of its
    delta stacks) slice after slice, and a point that starts before it is done carries those compiles. Returns
    {settled, waited_s, slices}: the warm-up slices run while waiting."""
    start = time.perf_counter()
    first = count = None
    clear = 0
    while True:
        try:
            warming, count = asyncio.run(_warming(worker_address))
        except Exception:  # a report: a worker that does not answer is not waited for
            return {"settled": False, "waited_s": round(time.perf_counter() - start, 1), "slices": 0}
        first = count if first is None else first
        clear = 0 if warming else clear + 1
        waited = time.perf_counter() - start
        if clear >= SETTLE_CLEAR_POLLS or waited >= limit_s:
            return {"settled": clear >= SETTLE_CLEAR_POLLS, "waited_s": round(waited, 1), "slices": count - first}
        time.sleep(SETTLE_POLL_S)


async def _status(worker_address: str):
    """One Status reply of the worker (its own channel)."""
    from deltazip.rpc.channels import aio_channel
    from deltazip.v1 import worker_pb2, worker_pb2_grpc

    async with aio_channel(worker_address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)


async def _warming(worker_address: str) -> tuple[bool, int]:
    """(whether the worker has kernel warm-up work left, its warm-up slices so far)."""
    reply = await _status(worker_address)
    return reply.kernels_warming, sum(p.count for p in reply.step_phases if p.name == "warmup")


async def _kernel_phases(worker_address: str) -> dict:
    """The worker's `warmup` and `compile` step-profile totals since it started: {phase: {count, seconds}}."""
    reply = await _status(worker_address)
    return {p.name: {"count": p.count, "seconds": round(p.seconds, 3)} for p in reply.step_phases
            if p.name in ("warmup", "compile")}


def run_mode(address: str, mode: str, bits: int | None, names: list[str], base_name: str, args, rows: list,
             latencies: list, base_runs: dict, worker_address: str | None = None,
             prefetch: Callable[[list[str]], dict] | None = None) -> None:
    """All points of one worker mode: base-only reference first (once per load), then every num_models x load."""
    for load in args.loads:
        if base_name and load not in base_runs:
            point = {"mode": BASE_MODE, "bits": None, "num_models": 0, "load": load, "rate_rps": args.rate_rps * load}
            reqs = scaled(with_model(workload(args, tuple(names)), base_name), load)
            base_runs[load] = {o.id: o for o in run_point(address, reqs, args, point, None, rows, latencies,
                                                                   worker_address)}
    first = True
    for num_models in args.num_models:
        reqs = workload(args, tuple(names[:num_models]))
        warm_up(address, mode, bits, names[:num_models], reqs, args, prefetch, worker_address)
        for load in args.loads:
            point = {"mode": mode, "bits": bits, "num_models": num_models, "load": load, "rate_rps": args.rate_rps * load}
            run_point(address, scaled(reqs, load), args, point, base_runs.get(load), rows, latencies, worker_address,
                      first_of_mode=first)
            first = False


def calibrate_rate(address: str, base_name: str, names: list[str], args) -> None:
    """--rate-rps 0: load 1 = --auto-fraction x the base model's capacity, measured here as the completion rate
    of --num-requests base requests that all arrive at once (closed burst, same prompts and lengths)."""
    probe = argparse.Namespace(**{**vars(args), "rate_rps": 1.0})  # arrival times are dropped below
    burst = [dataclasses.replace(r, timestamp=0.0) for r in with_model(workload(probe, tuple(names)), base_name)]
    bursts = []  # (capacity, completed, wall_s) per burst; the first one also warms the worker up
    for i in range(max(1, args.calibration_bursts)):
        renamed = [dataclasses.replace(r, id=f"cal{i}-{r.id}") for r in burst]
        outcomes, wall_s, _ = send(address, renamed, args, f"calibrate base capacity ({i + 1})")
        done = [o for o in outcomes if o.ok]
        if not done:
            raise RuntimeError("calibration failed: no base request completed")
        bursts.append((len(done) / max(wall_s, 1e-9), len(done), wall_s))
    capacity, completed, wall_s = bursts[-1]
    args.rate_rps = round(capacity * args.auto_fraction, 3)
    args.calibration = {"base_capacity_rps": capacity, "burst_requests": len(burst), "completed": completed,
                        "wall_s": wall_s, "auto_fraction": args.auto_fraction, "rate_rps": args.rate_rps,
                        "bursts_rps": [round(b[0], 3) for b in bursts]}
    print(f"calibrated: base capacity {capacity:.2f} req/s -> rate at load 1 = {args.rate_rps} req/s", flush=True)
