"""Bounded soak of the CPU stack: a fixed number of requests through the SDK (gRPC) and the gateway (HTTP).

Samples every service's RSS and open file descriptors and Redis's key counts (by documented key pattern) as
the requests go, and checks what a long-running cluster needs: memory of each DeltaZip service flat within 10%
after warm-up, no fd growth, no Redis keys without their documented TTL, p99 latency. Redis itself grows by one
request record per request until records start expiring (REQUEST_TTL_S); the summary gives bytes per record and
the steady state that implies at the measured rate.

    python -m bench.soak --num-requests 3000            # starts redis + store + worker + scheduler + gateway
Writes bench/results/soak-cpu-<date>.json ({bench, device, commit, date, config, summary, rows}); the short
form runs in tests/reliability/test_soak.py against the test stack.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from deltazip.client import Client
from deltazip.cluster import keys

RSS_SLACK = 0.10  # flat = within 10% of the level right after warm-up
FD_SLACK = 4  # a few fds come and go with connections being set up at the sample instant


@dataclass
class SoakTarget:
    """What to drive and watch: addresses and the pid of every service process."""

    scheduler: str
    gateway: str  # host:port of the HTTP gateway, '' = gRPC only
    redis_url: str
    pids: dict[str, int]  # service name -> pid
    models: tuple[str, ...]


@dataclass
class SoakConfig:
    num_requests: int = 400
    concurrency: int = 4
    max_tokens: int = 4
    num_samples: int = 20
    warmup_fraction: float = 0.25  # samples before this fraction of requests are warm-up
    http_every: int = 4  # every n-th request goes through the gateway


@dataclass
class Sample:
    requests_done: int
    elapsed_s: float
    rss_mb: dict[str, float]
    fds: dict[str, int]
    redis_keys: dict[str, int]
    redis_used_mb: float


@dataclass
class SoakState:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def num_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_key_counts(r: redis.Redis) -> dict[str, int]:
    """Keys per documented pattern (dz:request:<request_id> ...); undocumented keys count under '?'."""
    counts: dict[str, int] = {}
    for key in r.scan_iter("*", count=1000):
        spec = keys.match(key)
        pattern = spec.pattern if spec else "?"
        counts[pattern] = counts.get(pattern, 0) + 1
    return counts


def take_sample(target: SoakTarget, r: redis.Redis, done: int, start: float) -> Sample:
    info = r.info("memory")
    return Sample(done, round(time.monotonic() - start, 3), {n: round(rss_mb(p), 2) for n, p in target.pids.items()},
                  {n: num_fds(p) for n, p in target.pids.items()}, redis_key_counts(r),
                  round(info["used_memory"] / 2**20, 3))


def one_request(target: SoakTarget, cfg: SoakConfig, i: int, client: Client, state: SoakState) -> None:
    model = target.models[i % len(target.models)]
    prompt = f"soak request {i}: the quick brown fox"
    start = time.perf_counter()
    try:
        if target.gateway and i % cfg.http_every == 0:
            host, port = target.gateway.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0.0}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            conn.close()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}")
        else:
            client.generate(model, prompt, max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True,
                            request_id=f"soak-{i}")
    except Exception as exc:  # noqa: BLE001  (every failure is counted and reported)
        with state.lock:
            state.failures.append(f"{i}: {exc}")
        return
    with state.lock:
        state.latencies_ms.append((time.perf_counter() - start) * 1e3)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_soak(target: SoakTarget, cfg: SoakConfig) -> dict:
    """Drive `cfg.num_requests` requests, sampling as they go; returns {config, summary, rows}."""
    r = redis.Redis.from_url(target.redis_url, decode_responses=True)
    state = SoakState()
    every = max(1, cfg.num_requests // cfg.num_samples)
    start = time.monotonic()
    samples = [take_sample(target, r, 0, start)]
    with Client(target.scheduler, timeout_s=60) as client, \
            concurrent.futures.ThreadPoolExecutor(cfg.concurrency) as pool:
        for batch_start in range(0, cfg.num_requests, every):
            batch = range(batch_start, min(batch_start + every, cfg.num_requests))
            list(pool.map(lambda i: one_request(target, cfg, i, client, state), batch))
            samples.append(take_sample(target, r, batch.stop, start))
    wall_s = time.monotonic() - start
    request_keys = [k for k in r.scan_iter(match="dz:request:*", count=1000)]
    ttls = [r.ttl(k) for k in request_keys[:2000]]
    summary = summarize(cfg, samples, state, wall_s, ttls, len(request_keys))
    rows = [{"requests_done": s.requests_done, "elapsed_s": s.elapsed_s, "redis_used_mb": s.redis_used_mb,
             **{f"rss_mb_{n}": v for n, v in s.rss_mb.items()}, **{f"fds_{n}": v for n, v in s.fds.items()},
             **{f"keys {p}": c for p, c in sorted(s.redis_keys.items())}} for s in samples]
    return {"config": {**cfg.__dict__, "models": list(target.models)}, "summary": summary, "rows": rows}


def summarize(cfg: SoakConfig, samples: list[Sample], state: SoakState, wall_s: float, ttls: list[int],
              num_request_keys: int) -> dict:
    """Flatness after warm-up per service, fd growth, key TTLs, latency percentiles."""
    warm = next(s for s in samples if s.requests_done >= cfg.warmup_fraction * cfg.num_requests)
    after = [s for s in samples if s.requests_done >= warm.requests_done]
    rss_growth = {n: round(max(s.rss_mb[n] for s in after) / warm.rss_mb[n] - 1, 4) for n in warm.rss_mb}
    services = [n for n in rss_growth if n != "redis"]  # Redis grows by design: one record per request, 1 h TTL
    num_keys = [s.redis_keys.get("dz:request:<request_id>", 0) for s in (warm, samples[-1])]
    bytes_per_key = (samples[-1].redis_used_mb - warm.redis_used_mb) * 2**20 / max(1, num_keys[1] - num_keys[0])
    rate = len(state.latencies_ms) / wall_s
    fd_growth = {n: max(s.fds[n] for s in after) - warm.fds[n] for n in warm.fds}
    last = samples[-1]
    static = {p: c for p, c in last.redis_keys.items() if p != "dz:request:<request_id>"}
    static_warm = {p: c for p, c in warm.redis_keys.items() if p != "dz:request:<request_id>"}
    return {
        "num_requests": cfg.num_requests, "num_failed": len(state.failures), "failures": state.failures[:10],
        "wall_s": round(wall_s, 2), "throughput_rps": round(len(state.latencies_ms) / wall_s, 2),
        "e2e_p50_ms": round(percentile(state.latencies_ms, 50), 2),
        "e2e_p99_ms": round(percentile(state.latencies_ms, 99), 2),
        "e2e_max_ms": round(max(state.latencies_ms, default=0.0), 2),
        "rss_growth_after_warmup": rss_growth, "rss_flat": all(rss_growth[n] <= RSS_SLACK for n in services),
        "redis_bytes_per_request_record": round(bytes_per_key, 1),
        # steady state once records start expiring: arrivals/s x REQUEST_TTL_S records
        "redis_steady_state_mb_at_this_rate": round(rate * keys.REQUEST_TTL_S * bytes_per_key / 2**20, 1),
        "fd_growth_after_warmup": fd_growth, "fds_flat": all(g <= FD_SLACK for g in fd_growth.values()),
        "request_keys": num_request_keys, "request_keys_without_ttl": sum(t < 0 for t in ttls),
        "request_key_ttl_max_s": max(ttls, default=0), "undocumented_keys": last.redis_keys.get("?", 0),
        "other_keys_warmup": static_warm, "other_keys_end": static,
        "other_keys_flat": all(c <= static_warm.get(p, 0) for p, c in static.items()),
    }


def start_stack(work: Path, num_models: int):
    """redis (AOF) + store + worker + scheduler + gateway on loopback, tiny synthetic models pushed."""
    from bench.synthetic import write_suite
    from deltazip.stack import Launcher, start_redis
    from tests.integration.gateway_proc import start_gateway

    base_dir, artifacts = write_suite(work / "models", "tiny", num_models, kind="dense")
    redis_proc = start_redis(work / "redis", appendonly=True)
    launcher = Launcher(f"redis://{redis_proc.address}/0", work / "logs")
    store = launcher.start("delta_store", "--root", str(work / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        for name, path in artifacts.items():
            client.push(path, name, progress=False)
    worker = launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-kv-blocks", "256",
                            "--kv-block-size", "8", "--num-device-slots", "4", "--disk-cache-dir", str(work / "cache"))
    scheduler = launcher.start("scheduler")
    gateway = start_gateway(scheduler.address, work / "logs")
    pids = {p.name: p.popen.pid for p in (store, worker, scheduler, gateway, redis_proc)}
    target = SoakTarget(scheduler.address, gateway.address, launcher.redis_url, pids, tuple(artifacts))
    return target, [gateway, *reversed(launcher.procs), redis_proc]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--num-models", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    from bench.serve import git_commit
    from deltazip.stack import stop

    work = Path(tempfile.mkdtemp(prefix="dz-soak-"))
    target, procs = start_stack(work, args.num_models)
    try:
        cfg = SoakConfig(args.num_requests, args.concurrency, args.max_tokens, args.num_samples)
        result = run_soak(target, cfg)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    date = datetime.date.today().isoformat()
    payload = {"bench": "soak", "device": "cpu", "commit": git_commit(), "date": date, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-cpu-{date}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["summary"], indent=1))
    return path


if __name__ == "__main__":
    main()
