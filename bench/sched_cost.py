"""Scheduler CPU per request: what one scheduler process spends to admit, route and relay one request.

On the 4-GPU scale-out run (session 12) each of the 2 schedulers used a whole core at 150 req/s (13 ms of CPU per
request) while the 4 workers waited for work: the schedulers capped the cluster. This benchmark isolates that
cost. Redis + F paced fake workers (bench/relay_fake_worker.py: each publishes M fine-tunes on its device tier and
streams tokens at a decode step of --step-ms, chunked as the real worker chunks them) + M registered fine-tunes;
per variant one scheduler process is started and a closed burst of N requests over the M models is sent from C
client processes. Reported per variant: the scheduler's CPU ms per request (user + system, from /proc), Redis
commands per request (INFO commandstats, every client of Redis included: the fake workers' heartbeats are a few per
second), and throughput.

Variants: the scheduler of this checkout with burst prefetch on (its default) and off, and, with --baseline-tree,
the same two from another checkout (e.g. a `git worktree` of an older commit), interleaved in one run so the
ratio new / baseline is measured on the same machine at the same time. `--flush-ms 50,100,200` repeats them for
each of the workers' stream flush intervals (the worker's --stream-interval-ms): what fewer, larger chunks save.

    python -m bench.sched_cost --baseline-tree /tmp/dz-old --repeats 3     # bench/results/sched-cost-<label>-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.relay_clients import send_burst, summarize
from bench.relay_fake_worker import BASE, model_names
from bench.results_io import git_commit, write_results
from bench.scaleout_stack import cpu_seconds
from bench.workload import Request

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sched_cost", description=__doc__.splitlines()[0])
    p.add_argument("--num-models", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4, help="paced fake workers (processes)")
    p.add_argument("--num-requests", type=int, default=800)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--step-ms", type=float, default=28.0, help="the fake workers' decode step (28 ms: the 4-GPU run's)")
    p.add_argument("--num-clients", type=int, default=2)
    p.add_argument("--flush-ms", type=lambda v: [float(x) for x in v.split(",")], default=[50.0],
                   help="comma-separated stream flush intervals of the fake workers (the worker's default is 50)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another checkout whose scheduler is measured in the same run (e.g. a git worktree)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--scheduler-log-level", default="warning", help="info logs every request (costs CPU)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--label", default=f"cpu{os.cpu_count()}")
    args = p.parse_args(argv)
    if min(args.num_models, args.num_workers, args.num_requests, args.num_clients, args.repeats) < 1:
        p.error("counts must be >= 1")
    if args.baseline_tree is not None and not (args.baseline_tree / "services" / "scheduler").is_dir():
        p.error(f"--baseline-tree {args.baseline_tree} is not a DeltaZip checkout (no services/scheduler)")
    return args


def register_models(url: str, num_models: int) -> None:
    from deltazip.cluster.connection import connect
    from deltazip.cluster.models import ModelRecord, ModelRegistry

    async def go() -> None:
        client = connect(url)
        registry = ModelRegistry(client)
        for name in model_names(num_models):
            await registry.register(ModelRecord(name, base=BASE))
        await client.aclose()

    asyncio.run(go())


def start_scheduler(tree: Path, url: str, flags: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m services.scheduler` from `tree` (its own code first on sys.path), waited on until SERVING."""
    from deltazip.rpc.health import wait_for_serving
    from deltazip.rpc.ports import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "services.scheduler", "--host", "127.0.0.1", "--port", str(port), "--redis-url", url,
           "--base-name", BASE, "--max-queue-per-worker", "0", *flags]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        wait_for_serving(address, 30.0)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"scheduler from {tree} did not start; see {log_path}") from None
    return proc, address


def redis_calls(client: redis.Redis) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items() if k.startswith("cmdstat_"))


def run_variant(name: str, tree: Path, flags: list[str], url: str, requests: list[Request], args, rep: int,
                work: Path) -> dict:
    proc, address = start_scheduler(tree, url, [*flags, "--log-level", args.scheduler_log_level],
                                    work / f"scheduler-{name}.log")
    client = redis.Redis.from_url(url)
    try:
        send_burst([address], requests[:32], 1, args.timeout_s, f"warm-{name}-{rep}-")
        time.sleep(1.0)  # the warm requests' bookkeeping done
        cpu0, calls0 = cpu_seconds(proc.pid), redis_calls(client)
        seen, wall_s, client_cpu_s = send_burst([address], requests, args.num_clients, args.timeout_s, f"{name}-{rep}-")
        cpu_s, calls = cpu_seconds(proc.pid) - cpu0, redis_calls(client) - calls0
    finally:
        proc.terminate()
        proc.wait(30)
        client.close()
    done = summarize(seen)
    row = {"variant": name, "repeat": rep, "scheduler_flags": flags, "wall_s": round(wall_s, 3),
           "scheduler_cpu_ms_per_request": round(1e3 * cpu_s / len(requests), 3),
           "scheduler_cpu_util": round(cpu_s / wall_s, 3),
           "redis_commands_per_request": round(calls / len(requests), 2),
           "client_cpu_util": round(client_cpu_s / wall_s, 3), **done}
    print(f"{name} #{rep}: {row['scheduler_cpu_ms_per_request']:.2f} ms CPU/request, "
          f"{row['redis_commands_per_request']:.1f} redis commands/request, {done['throughput_rps']:.1f} req/s, "
          f"{done['tokens_per_chunk']:.2f} tok/chunk, failed {done['num_failed']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> Path:
    from deltazip.rpc.ports import free_port
    from deltazip.stack import start_redis, stop

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dz-sched-cost-"))
    trees = {"this": REPO_ROOT, **({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})}
    variants = [(f"{tree}-prefetch-{mode}", path, [] if mode == "on" else ["--prefetch-interval-s", "0"])
                for tree, path in trees.items() for mode in ("on", "off")]
    prompt = "delta " * 8
    requests = [Request(f"r{i:05d}", prompt, 0.0, f"ft-{i % args.num_models:03d}", args.output_len, args.output_len)
                for i in range(args.num_requests)]
    redis_proc = start_redis(work / "redis")
    url = f"redis://{redis_proc.address}/0"
    rows = []
    try:
        register_models(url, args.num_models)
        for flush_ms in args.flush_ms:
            fakes = []
            try:
                for _ in range(args.num_workers):
                    cmd = [sys.executable, "-m", "bench.relay_fake_worker", "--redis-url", url, "--port",
                           str(free_port()), "--chunk-tokens", "8", "--step-ms", str(args.step_ms), "--num-models",
                           str(args.num_models), "--flush-ms", str(flush_ms)]
                    fakes.append(subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
                time.sleep(3.0)  # imported, serving and heartbeating
                for rep in range(args.repeats):
                    for name, tree, flags in variants:
                        tag = name if len(args.flush_ms) == 1 else f"{name}-flush{flush_ms:g}ms"
                        rows.append(run_variant(tag, tree, flags, url, requests, args, rep, work))
            finally:
                for fake in fakes:
                    fake.terminate()
                    fake.wait(30)
                time.sleep(6.0)  # past the fakes' heartbeat TTL (5 s): the next flush setting's fakes alone
    finally:
        stop(redis_proc)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {key: statistics.median(r[key] for r in mine)
                         for key in ("scheduler_cpu_ms_per_request", "redis_commands_per_request", "throughput_rps")}
    ratios = {}
    if args.baseline_tree and len(args.flush_ms) == 1:
        for mode in ("on", "off"):
            new, old = summary[f"this-prefetch-{mode}"], summary[f"baseline-prefetch-{mode}"]
            ratios[f"prefetch-{mode}"] = {
                "cpu_per_request_baseline_over_this": round(old["scheduler_cpu_ms_per_request"]
                                                            / new["scheduler_cpu_ms_per_request"], 3),
                "redis_commands_baseline_over_this": round(old["redis_commands_per_request"]
                                                           / new["redis_commands_per_request"], 3)}
    baseline_commit = ""
    if args.baseline_tree:
        done = subprocess.run(["git", "-C", str(args.baseline_tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
        baseline_commit = done.stdout.strip()
    payload = {"bench": "sched_cost", "device": "cpu", "commit": git_commit(), "baseline_commit": baseline_commit,
               "date": datetime.date.today().isoformat(), "host": {"num_cpus": os.cpu_count()},
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "limit": "one scheduler is one asyncio thread: 1 core / (CPU ms per request) is its request rate",
               "summary": summary, "ratios": ratios, "rows": rows}
    path = write_results(args.out, "sched-cost", args.label, payload)
    for name, s in summary.items():
        print(f"{name}: {s['scheduler_cpu_ms_per_request']:.2f} ms CPU/request "
              f"(ceiling {1e3 / s['scheduler_cpu_ms_per_request']:.0f} req/s per scheduler process), "
              f"{s['redis_commands_per_request']:.1f} redis commands/request, {s['throughput_rps']:.1f} req/s")
    if ratios:
        print(f"baseline / this: {ratios}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
