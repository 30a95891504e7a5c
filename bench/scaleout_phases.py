"""The phases of the scale-out benchmark: a scaling point (K fresh workers), a burst run, and the run summary.

Each returns result rows with the serving metrics of bench/replay.py plus the scale-out ones of
bench/scaleout_measure.py; bench/scaleout.py decides what runs within the budget.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.replay import summarize
from bench.scaleout_measure import (StoreSampler, burst_workload, count_log_events, cpu_util, request_tiers,
                                    worker_stats)
from bench.scaleout_stack import ScaleoutStack
from bench.split_replay import split_replay
from bench.workload import WorkloadConfig

RESERVE_S = 25.0  # kept back from the budget for stopping everything and writing results


def replay_timeout_s(args, budget, replays_left: int = 1, keep_s: float = 0.0) -> float:
    """Per-request timeout of one replay: --timeout-s, --pass-timeout-s, and this replay's share of the budget
    left once `keep_s` is kept for what comes after (at least 20 s), the smallest."""
    share_s = (budget.left() - RESERVE_S - keep_s) / max(replays_left, 1)
    return min(args.timeout_s, args.pass_timeout_s or float("inf"), max(20.0, share_s))


def warm_up(workers, models: list[str], timeout_s: float, max_tokens: int = 4) -> None:
    """Two requests per model straight to every worker, concurrently: CUDA init and kernel JIT are not timed."""
    import concurrent.futures
    import uuid

    import grpc

    from deltazip.client.requests import sampling_params
    from deltazip.rpc.channels import sync_channel
    from deltazip.v1 import worker_pb2, worker_pb2_grpc

    def one(job) -> None:
        proc, model, i = job
        with sync_channel(proc.address) as channel:
            request = worker_pb2.WorkerGenerateRequest(
                request_id=f"warmup-{uuid.uuid4().hex[:12]}", model=model, prompt="warm up " * (1 + 5 * i),
                sampling=sampling_params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            try:
                for _ in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=timeout_s):
                    pass
            except grpc.RpcError as exc:
                raise RuntimeError(f"warm-up of {model} on worker {proc.address} failed: {exc.code()} "
                                   f"{exc.details()}") from None

    jobs = [(p, m, i) for p in workers for m in models for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(one, jobs))


def preload(workers, models: list[str], tier: str, timeout_s: float, per_worker: int = 4) -> float:
    """LoadDelta of every model on every worker (`tier` device or host), `per_worker` at a time on each; returns the
    seconds it took. The resident pass's workers then serve with no fetch or load in the measured window."""
    import concurrent.futures

    import grpc

    from deltazip.rpc.channels import sync_channel
    from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    want = common_pb2.RESIDENCY_TIER_DEVICE if tier == "device" else common_pb2.RESIDENCY_TIER_HOST

    def one_worker(proc) -> None:
        with sync_channel(proc.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            def one(model: str) -> None:
                try:
                    stub.LoadDelta(worker_pb2.LoadDeltaRequest(model=model, tier=want), timeout=timeout_s)
                except grpc.RpcError as exc:
                    raise RuntimeError(f"preload of {model} on worker {proc.address} failed: {exc.code()} "
                                       f"{exc.details()}") from None

            with concurrent.futures.ThreadPoolExecutor(per_worker) as pool:
                list(pool.map(one, models))

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(one_worker, workers))
    return time.monotonic() - t


def measure(stack: ScaleoutStack, args, requests, id_prefix: str, desc: str, timeout_s: float) -> tuple[list, dict]:
    """One split replay with store sampling, worker and CPU counters around it; returns (outcomes, row fields)."""
    workers_before, cpu_before = stack.scrape(stack.workers), {}

    def at_start() -> None:
        cpu_before.update(stack.cpu(), t0=time.monotonic())

    with StoreSampler(stack) as sampler:
        outcomes, wall_s, clients = split_replay(stack.scheduler_addresses, requests, timeout_s, desc,
                                                 args.num_clients, id_prefix, on_start=at_start)
    cpu_after, cpu_wall_s = stack.cpu(), time.monotonic() - cpu_before.pop("t0")
    workers_after = stack.scrape(stack.workers)
    row = {"offered_rps": len(requests) / max(requests[-1].timestamp, 1e-9), **summarize(outcomes, wall_s, None, 1.0),
           **sampler.summary(), **worker_stats(workers_before, workers_after, cpu_wall_s),  # replay start to end
           **cpu_util(cpu_before, cpu_after, cpu_wall_s),
           "cpu_client": [round(c / wall_s, 3) for c in clients["client_cpu_s"]]}
    return outcomes, row


def latency_entry(point: dict, outcomes) -> dict:
    done = [o for o in outcomes if o.ok]
    return {**point, "ttft_ms": sorted(round(o.ttft_ms, 2) for o in done),
            "e2e_ms": sorted(round(o.e2e_ms, 2) for o in done)}


def scale_point(stack: ScaleoutStack, args, k: int, base_dir: Path, warm_model: str, requests, budget,
                worker_flags: list[str], on_row, keep_s: float = 0.0, seed: dict[str, Path] | None = None) -> list[dict]:
    """K fresh workers, warm-up, then the scaling workload once per pass: `cold` (empty delta caches: fetches from
    the stores are part of it), `warm` (the same requests again, deltas already on the workers, wherever routing
    put them) or `resident` (alone: the workers start with `seed`, every delta, in their disk caches, and every
    delta is loaded onto every worker, --resident-tier, before the replay: steady-state serving, no fetch or load
    in the window). Calls `on_row(row, outcomes)` as each pass ends; returns the rows. `keep_s`: budget kept for
    later phases."""
    t = time.monotonic()
    stack.start_workers(k, f"k{k}", base_dir, args.device, max(args.num_gpus, 1), worker_flags,
                        timeout_s=min(600.0, max(60.0, budget.left() - RESERVE_S)), seed=seed)
    start_s = time.monotonic() - t
    budget.say(f"K={k}: {k} worker(s) up in {start_s:.1f}s; warming up")
    t = time.monotonic()
    warm_up(stack.workers, [base_dir.name, warm_model], timeout_s=min(600.0, max(30.0, budget.left() - RESERVE_S)))
    warmup_s = time.monotonic() - t
    preload_s = None
    if "resident" in args.passes:
        models = sorted(seed) if seed else sorted({r.model for r in requests})
        budget.say(f"K={k}: loading {len(models)} deltas onto each worker ({args.resident_tier})")
        preload_s = preload(stack.workers, models, args.resident_tier, min(600.0, max(30.0, budget.left() - RESERVE_S)))
    results = []
    for i, cache in enumerate(args.passes):
        timeout_s = replay_timeout_s(args, budget, len(args.passes) - i, keep_s)
        outcomes, row = measure(stack, args, requests, f"k{k}-{cache}-", f"K={k} {cache}", timeout_s)
        row = {"phase": "scale", "pass": cache, "num_workers": k, "num_models": args.num_models,
               "worker_start_s": start_s, "warmup_s": warmup_s, **({"preload_s": preload_s} if preload_s else {}),
               **row}
        row["saturated"] = row["throughput_rps"] < 0.9 * row["offered_rps"]  # else the load, not K, set the rate
        on_row(row, outcomes)
        results.append(row)
    return results


def burst_run(stack: ScaleoutStack, args, models: list[str], cold_model: str, prefetch: bool, rep: int,
              budget, replays_left: int = 1) -> tuple[dict, list]:
    """A burst on `cold_model` over a Zipf background, on the running workers, prefetch on or off."""
    background = WorkloadConfig(tuple(models), args.burst_bg_requests, args.burst_bg_rate_rps, "gamma", args.cv,
                                args.zipf_alpha, args.prompt_len, 4 * args.prompt_len, args.output_len,
                                4 * args.output_len, args.seed + 100 + rep)
    requests = burst_workload(background, cold_model, args.burst_size, args.burst_at_s, args.burst_span_s)
    tag = f"burst{rep}-{'on' if prefetch else 'off'}-"
    timeout_s = replay_timeout_s(args, budget, replays_left)
    outcomes, row = measure(stack, args, requests, tag, f"burst {'on' if prefetch else 'off'}", timeout_s)
    burst = [o for o in outcomes if o.id.startswith("burst-")]
    tiers = request_tiers(stack, [tag + o.id for o in burst])
    b = summarize(burst, 1.0, None, 1.0)
    bg = summarize([o for o in outcomes if not o.id.startswith("burst-")], 1.0, None, 1.0)
    row = {"phase": "burst", "prefetch": "on" if prefetch else "off", "repeat": rep, "model": cold_model,
           "num_workers": len(stack.workers), "burst_size": len(burst), **row,
           **{k: b[k] for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p90_ms", "e2e_p99_ms")},
           "burst_num_failed": b["num_failed"], "background_ttft_p90_ms": bg["ttft_p90_ms"],
           "background_e2e_p90_ms": bg["e2e_p90_ms"],
           "burst_tiers": {t: tiers.count(t) for t in sorted(set(tiers))},
           "warm_hit_fraction": sum(t in ("device", "host") for t in tiers) / max(len(tiers), 1),
           "prefetches_started": count_log_events(stack, "burst_detected", cold_model)}
    return row, burst


def summarize_run(rows: list[dict]) -> dict:
    """Scaling ratios vs K = 1, burst TTFT p90 with and without prefetch, store throughput."""
    summary: dict = {}
    for cache in ("cold", "warm", "resident"):
        scale = {r["num_workers"]: r for r in rows if r["phase"] == "scale" and r["pass"] == cache}
        one = scale.get(1)
        for r in scale.values():
            r["scaling_vs_1"] = r["throughput_rps"] / one["throughput_rps"] if one and one["throughput_rps"] > 0 else None
        if scale:
            kmax = max(scale)
            summary[cache] = {"throughput_rps_by_workers": {str(k): r["throughput_rps"] for k, r in sorted(scale.items())},
                              f"scaling_{kmax}_over_1": scale[kmax]["scaling_vs_1"],
                              "all_points_saturated": all(r["saturated"] for r in scale.values())}
    bursts = [r for r in rows if r["phase"] == "burst"]
    for mode in ("on", "off"):
        mine = [r["ttft_p90_ms"] for r in bursts if r["prefetch"] == mode]
        if mine:
            summary[f"burst_ttft_p90_ms_prefetch_{mode}"] = sum(mine) / len(mine)
    if "burst_ttft_p90_ms_prefetch_on" in summary and "burst_ttft_p90_ms_prefetch_off" in summary:
        summary["burst_ttft_p90_off_over_on"] = (summary["burst_ttft_p90_ms_prefetch_off"]
                                                 / max(summary["burst_ttft_p90_ms_prefetch_on"], 1e-9))
    served = [r for r in rows if r.get("store_bytes_served")]
    if served:
        summary["store_bytes_per_s_peak_1s"] = max(r["store_bytes_per_s_peak_1s"] for r in served)
        summary["store_bytes_served"] = sum(r["store_bytes_served"] for r in served)
    fetched = [r for r in rows if r.get("worker_fetch_s")]
    if fetched:
        summary["worker_fetch_bytes"] = sum(r["worker_fetch_bytes"] for r in fetched)
        summary["worker_fetch_bytes_per_s"] = summary["worker_fetch_bytes"] / sum(r["worker_fetch_s"] for r in fetched)
    push = [r for r in rows if r["phase"] == "push"]
    if push:
        summary["push_bytes_per_s"] = push[0]["bytes_per_s"]
    return summary
