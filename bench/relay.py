"""Relay ceiling: requests/s and tokens/s the whole stack sustains when the engine is not the bottleneck.

Starts redis + a delta store + S schedulers + one worker (tiny random model, CPU) as processes, then sends a closed
burst of requests (all at t=0, fixed output length, ignore_eos) from C client processes spread over the
schedulers, once per variant, variants interleaved. Variants differ only in flags (worker --stream-chunk-tokens,
number of schedulers and client processes), so the old one-message-per-token path is measured in the same run as
the new one; `relay-only-*` variants put an engine-less worker (bench/relay_fake_worker.py) behind the scheduler,
which isolates the relay. An engine-only reference (the same burst through the worker's EngineLoop in this
process, no gRPC) shows what the engine alone sustains. CPU ms per request per process say where the work goes;
`--py-spy PATH` adds one profiled burst per variant (bench/relay_profile.py; not used for the ratios).

    python -m bench.relay --repeats 3 --torch-threads 1 --py-spy /path/to/py-spy   # bench/results/relay-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.relay_clients import send_burst, summarize
from bench.relay_profile import profile, top_frames
from bench.results_io import device_name, git_commit, write_results
from bench.scaleout_stack import cpu_seconds
from bench.workload import Request


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    worker_flags: tuple[str, ...] = ()
    num_schedulers: int = 1
    num_clients: int = 1
    fake_worker: bool = False  # bench/relay_fake_worker.py instead of the real worker: the relay alone

    @property
    def chunk_tokens(self) -> int:
        flags = list(self.worker_flags)
        return int(flags[flags.index("--stream-chunk-tokens") + 1]) if "--stream-chunk-tokens" in flags else 8


VARIANTS = {
    "per-token": Variant("per-token", ("--stream-chunk-tokens", "1")),  # the old path: one message per token
    "chunk4": Variant("chunk4", ("--stream-chunk-tokens", "4")),
    "chunk8": Variant("chunk8", ("--stream-chunk-tokens", "8")),
    "chunk16": Variant("chunk16", ("--stream-chunk-tokens", "16")),
    "chunk8-2sched-2clients": Variant("chunk8-2sched-2clients", ("--stream-chunk-tokens", "8"), 2, 2),
    # No engine: the scheduler + client relay's own ceiling, one message per token vs chunks of 8
    "relay-only-per-token": Variant("relay-only-per-token", ("--stream-chunk-tokens", "1"), fake_worker=True),
    "relay-only-chunk8": Variant("relay-only-chunk8", ("--stream-chunk-tokens", "8"), fake_worker=True),
    "relay-only-chunk8-2sched-2clients": Variant("relay-only-chunk8-2sched-2clients", ("--stream-chunk-tokens", "8"),
                                                 2, 2, fake_worker=True),
}

DEFAULT_VARIANTS = ["per-token", "chunk8", "chunk8-2sched-2clients", "relay-only-per-token", "relay-only-chunk8",
                    "relay-only-chunk8-2sched-2clients"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    p.add_argument("--variants", type=lambda s: s.split(","), default=DEFAULT_VARIANTS,
                   help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="intra-op threads of the worker's engine (and the engine-only run); 0 = torch's default")
    p.add_argument("--repeats", type=int, default=1, help="bursts per variant (the best is reported too)")
    p.add_argument("--py-spy", default="", help="py-spy binary: one more burst per variant with the worker and a "
                                                "scheduler recorded (not used for the ratios)")
    p.add_argument("--profile-dir", type=Path, default=Path("/tmp/dz-relay-profiles"))
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", default="cpu")
    p.add_argument("--machine", default="2-core CPU box", help="what ran this, stored in the JSON")
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; valid: {list(VARIANTS)}")
    return args


def burst(args, model: str) -> list[Request]:
    prompt = ("delta " * args.prompt_len)[: args.prompt_len]  # byte tokenizer: one character = one token
    return [Request(f"r{i:05d}", prompt, 0.0, model, args.output_len, args.output_len) for i in range(args.num_requests)]


@dataclass
class RelayStack:
    """redis + store + schedulers + worker; schedulers and worker restarted per variant."""

    work: Path
    base_dir: Path
    worker_base_flags: list[str]
    worker_env: dict[str, str] = field(default_factory=dict)
    schedulers: list = field(default_factory=list)
    worker: object = None
    fake: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        from deltazip.stack import Launcher, start_redis

        self.redis = start_redis(self.work / "redis")
        self.launcher = Launcher(f"redis://{self.redis.address}/0", self.work / "logs")
        self.store = self.launcher.start("delta_store", "--root", str(self.work / "store"))

    def start(self, variant: Variant) -> None:
        if variant.fake_worker:
            from deltazip.rpc.ports import free_port

            cmd = [sys.executable, "-m", "bench.relay_fake_worker", "--redis-url", self.launcher.redis_url,
                   "--port", str(free_port()), "--chunk-tokens", str(variant.chunk_tokens)]
            self.fake = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
            time.sleep(3.0)  # imported, serving and heartbeating
        else:
            self.worker = self.launcher.start("worker", "--base-dir", str(self.base_dir), "--device", "cpu",
                                              "--heartbeat-s", "0.5", "--heartbeat-ttl-s", "2",
                                              *self.worker_base_flags, *variant.worker_flags, env=self.worker_env)
        self.schedulers = [self.launcher.start("scheduler", "--max-queue-per-worker", "0", "--base-name",
                                               self.base_dir.name) for _ in range(variant.num_schedulers)]

    def stop_variant(self) -> None:
        from deltazip.stack import stop

        for proc in [*self.schedulers, *([self.worker] if self.worker else [])]:
            stop(proc, timeout_s=30)
            self.launcher.procs.remove(proc)
        if self.fake is not None:
            self.fake.terminate()
            self.fake.wait(30)
        self.schedulers, self.worker, self.fake = [], None, None
        time.sleep(2.5)  # past the heartbeat TTL: nothing routes to the old worker

    def pids(self) -> dict[str, int]:
        named = {"worker": self.worker.popen.pid if self.worker else self.fake.pid, "redis": self.redis.popen.pid}
        named.update({f"scheduler{i}": p.popen.pid for i, p in enumerate(self.schedulers)})
        return named

    def close(self) -> None:
        from deltazip.stack import stop

        self.launcher.stop_all()
        stop(self.redis)


def engine_only(base_dir: Path, args) -> dict:
    """The same burst through the worker's EngineLoop in this process (no gRPC, no asyncio): the engine's rate."""
    import threading

    from services.worker.bootstrap import build_worker
    from services.worker.config import WorkerConfig
    from deltazip.model.sampling import SamplingParams

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    parts = build_worker(WorkerConfig(base_dir=str(base_dir), device="cpu", max_num_seqs=args.max_num_seqs,
                                      num_kv_blocks=4096, worker_id="engine-only"))
    parts.loop.start()
    done, lock, num_tokens = threading.Event(), threading.Lock(), [0, 0]
    prompt = list(range(3, 3 + args.prompt_len))
    sampling = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    def sink(event) -> None:
        with lock:
            num_tokens[0] += len(event.token_ids)
            num_tokens[1] += event.finished
            if num_tokens[1] == args.num_requests:
                done.set()
    try:
        start = time.perf_counter()
        for i in range(args.num_requests):
            parts.loop.submit(f"e{i}", prompt, sampling, None, sink)
        done.wait(args.timeout_s)
        span_s = time.perf_counter() - start
    finally:
        parts.close()
    return {"variant": "engine-only", "throughput_rps": num_tokens[1] / span_s, "tokens_per_s": num_tokens[0] / span_s,
            "span_s": span_s}


def run_variant(stack: RelayStack, variant: Variant, requests: list[Request], args, rep: int,
                profiled: bool = False) -> dict:
    """One burst; `profiled` runs py-spy beside it (which takes CPU: such rows are not compared)."""
    stack.start(variant)
    try:
        addresses = [p.address for p in stack.schedulers]
        send_burst(addresses, requests[: max(8, len(requests) // 16)], 1, args.timeout_s, f"warm-{variant.name}-{rep}-")
        pids = stack.pids()
        before = {who: cpu_seconds(pid) for who, pid in pids.items()}
        spies = profile(args.py_spy, pids, args.profile_dir, variant.name, 6) if profiled else []
        outcomes, wall_s, client_cpu_s = send_burst(addresses, requests, variant.num_clients, args.timeout_s,
                                                    f"{variant.name}-{rep}-")
        cpu = {who: round((cpu_seconds(pid) - before[who]) / wall_s, 3) for who, pid in pids.items()}
        cpu["clients"] = round(client_cpu_s / wall_s, 3)
        idle, _, _ = send_burst(addresses, requests[:8], 1, args.timeout_s, f"idle-{variant.name}-{rep}-")
        for spy in spies:
            spy.wait(60)
        profiles = {who: top_frames(args.profile_dir / f"{variant.name}-{who}.txt") for who in ("worker", "scheduler0")
                    if spies and (args.profile_dir / f"{variant.name}-{who}.txt").exists()}
    finally:
        stack.stop_variant()
    row = {"variant": variant.name, "repeat": rep, "profiled": profiled, "num_schedulers": variant.num_schedulers,
           "num_client_procs": variant.num_clients, "worker_flags": list(variant.worker_flags),
           **summarize(outcomes), "idle_ttft_p50_ms": summarize(idle)["ttft_p50_ms"], "cpu_util": cpu,
           "cpu_ms_per_request": {who: round(1e3 * u * wall_s / len(requests), 3) for who, u in cpu.items()}, **({"profile": profiles} if profiles else {})}
    print(f"{variant.name} #{rep}: {row['throughput_rps']:.1f} req/s, {row['tokens_per_s']:.0f} tok/s, idle ttft "
          f"{row['idle_ttft_p50_ms']:.1f} ms, "
          f"{row['tokens_per_chunk']:.2f} tok/chunk, ttft p50 "
          f"{row['ttft_p50_ms']:.0f} ms, failed {row['num_failed']}, cpu {cpu}", flush=True)
    return row


def _best(key: str):
    """Highest throughput, lowest latency."""
    return max if key == "throughput_rps" else min


def main(argv: list[str] | None = None) -> Path:
    from bench.synthetic import shape_config, write_base

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dz-relay-"))
    base_dir = write_base(work / "tiny-base", shape_config("tiny"))
    rows = [engine_only(base_dir, args)]
    print(f"engine-only: {rows[0]['throughput_rps']:.1f} req/s, {rows[0]['tokens_per_s']:.0f} tok/s", flush=True)
    worker_flags = ["--max-num-seqs", str(args.max_num_seqs), "--num-kv-blocks", "4096"]
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}
    stack = RelayStack(work, base_dir, worker_flags, env)
    try:
        requests = burst(args, base_dir.name)
        for rep in range(args.repeats):
            for name in args.variants:
                rows.append(run_variant(stack, VARIANTS[name], requests, args, rep))
        if args.py_spy:
            for name in args.variants:
                rows.append(run_variant(stack, VARIANTS[name], requests, args, args.repeats, profiled=True))
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    measured = collections.defaultdict(list)  # variant -> its rows without py-spy beside them
    for r in rows[1:]:
        if not r["profiled"]:
            measured[r["variant"]].append(r)
    ratios = {}
    for name, runs in measured.items():  # each against the one-message-per-token run with the same kind of worker
        old = measured.get("relay-only-per-token" if VARIANTS[name].fake_worker else "per-token")
        if old:
            ratios[name] = {f"{key}_vs_per_token_{how}": pick([r[key] for r in runs]) / pick([r[key] for r in old])
                            for key in ("throughput_rps", "ttft_p50_ms", "idle_ttft_p50_ms")
                            for how, pick in (("median", statistics.median), ("best", _best(key)))}
    payload = {"bench": "relay", "device": device_name("cpu"), "machine": args.machine, "commit": git_commit(),
               "date": datetime.date.today().isoformat(), "config": {k: str(v) for k, v in vars(args).items()},
               "ratios": ratios, "rows": rows}
    path = write_results(args.out, "relay", args.label, payload)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
