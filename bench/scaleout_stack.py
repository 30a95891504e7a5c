"""The scale-out topology on one host: redis + 2 delta stores + 2 schedulers + K workers, each a process.

Every process serves Prometheus /metrics on its own port, so the benchmark reads bytes served by the stores
and fetched by the workers from the services themselves. Worker i is pinned to GPU i % num_gpus
(CUDA_VISIBLE_DEVICES) and lists the stores rotated by i, so the workers' fetches spread over both stores
(a worker fetches from the first store it lists that answers; the others are its failover).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import time
from pathlib import Path

from deltazip.rpc.ports import free_port
from deltazip.metrics import scrape
from deltazip.stack import Launcher, Proc, start_redis, stop

# a busy GPU worker must not miss its heartbeat; a stopped one unregisters itself, so the TTL matters only for a kill
HEARTBEAT_FLAGS = ("--heartbeat-s", "0.5", "--heartbeat-ttl-s", "5")
HEARTBEAT_TTL_S = 5.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc; 0 when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """`cpu_seconds` of a process and every live descendant (a scheduler's --processes children, a worker's fetch
    processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu_seconds(current)
        todo.extend(children.get(current, []))
    return total


def seed_cache(cache_dir: Path, artifacts: dict[str, Path]) -> None:
    """A worker disk cache holding `artifacts` (name -> artifact folder), as if fetched: hard links, else copies."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name, path in artifacts.items():
        shutil.copytree(path, cache_dir / name, copy_function=link_or_copy, dirs_exist_ok=True)


class ScaleoutStack:
    """Starts and stops the services; knows their addresses, metrics ports and logs."""

    def __init__(self, work: Path, num_stores: int, num_schedulers: int, scheduler_flags: list[str]):
        self.work = work
        self.redis = start_redis(work / "redis")
        self.redis_url = f"redis://{self.redis.address}/0"
        self.launcher = Launcher(self.redis_url, work / "logs")
        self.metrics_port: dict[str, int] = {}  # process address -> its /metrics port
        self.stores: list[Proc] = []
        self.schedulers: list[Proc] = []
        self.workers: list[Proc] = []
        self.scheduler_flags = scheduler_flags
        self.num_scheduler_starts = 0
        try:
            with concurrent.futures.ThreadPoolExecutor(num_stores + num_schedulers) as pool:
                stores = [pool.submit(self._start, "delta_store", "--root", str(work / f"store-{i}"), "--store-id",
                                      f"store-{i}", *HEARTBEAT_FLAGS) for i in range(num_stores)]
                self.stores = [f.result() for f in stores]
            self.start_schedulers(num_schedulers, prefetch=True)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, *args: str, env: dict[str, str] | None = None, timeout_s: float | None = None) -> Proc:
        port = free_port()
        proc = self.launcher.start(name, *args, "--metrics-port", str(port), env=env, timeout_s=timeout_s)
        self.metrics_port[proc.address] = port
        return proc

    def _stop(self, procs: list[Proc], timeout_s: float = 30.0) -> list[int | None]:
        """Stop `procs` in parallel; returns their exit codes."""
        with concurrent.futures.ThreadPoolExecutor(max(1, len(procs))) as pool:
            codes = list(pool.map(lambda p: stop(p, timeout_s=timeout_s), procs))
        for proc in procs:
            self.launcher.procs.remove(proc)
        return codes

    @property
    def scheduler_addresses(self) -> list[str]:
        return [p.address for p in self.schedulers]

    @property
    def store_addresses(self) -> list[str]:
        return [p.address for p in self.stores]

    def start_schedulers(self, num: int, prefetch: bool, interval_s: str = "0.5") -> None:
        """(Re)start `num` schedulers, burst prefetch on (detector every `interval_s`) or off (interval 0)."""
        if self.schedulers:
            self._stop(self.schedulers)
        self.num_scheduler_starts += 1
        flags = [*self.scheduler_flags, "--prefetch-interval-s", interval_s if prefetch else "0"]
        tag = self.num_scheduler_starts
        with concurrent.futures.ThreadPoolExecutor(num) as pool:
            futures = [pool.submit(self._start, "scheduler", *flags, "--scheduler-id", f"s{i}-{tag}") for i in range(num)]
            self.schedulers = [f.result() for f in futures]

    def push(self, artifacts: dict[str, Path], replicas: int, more_replicas=lambda: True,
             max_parallel: int = 4) -> tuple[int, int]:
        """Push every artifact to `replicas` stores, one round per replica (round 0: each artifact to one store,
        round robin, so every model is somewhere early); a round after the first runs only if `more_replicas()`.
        Returns (bytes pushed, rounds done). Workers list every store, so a model held by one store is found."""
        from deltazip.client import Client

        def one(job: tuple[str, Path, str]) -> int:
            name, path, store = job
            with Client("127.0.0.1:1", store=store, timeout_s=3600) as client:
                client.push(path, name, progress=False)
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

        stores, pushed, rounds = self.store_addresses, 0, 0
        with concurrent.futures.ThreadPoolExecutor(max_parallel) as pool:
            for r in range(min(replicas, len(stores))):
                if r and not more_replicas():
                    break
                jobs = [(n, p, stores[(i + r) % len(stores)]) for i, (n, p) in enumerate(artifacts.items())]
                pushed += sum(pool.map(one, jobs))
                rounds += 1
        return pushed, rounds

    def start_workers(self, num: int, tag: str, base_dir: Path, device: str, num_gpus: int,
                      worker_flags: list[str], timeout_s: float = 600.0, seed: dict[str, Path] | None = None) -> list[Proc]:
        """`num` fresh workers started in parallel, worker i on GPU i % num_gpus; their disk caches are empty, or
        hold the artifacts of `seed` (name -> folder; hard links where the file system allows, else copies)."""
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        gpus = visible or [str(g) for g in range(num_gpus)]

        def one(i: int) -> Proc:
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if device.startswith("cuda") else {}
            if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
                env["OMP_NUM_THREADS"] = "1"  # CPU workers share the cores; torch's default would oversubscribe
            if seed:
                seed_cache(self.work / "caches" / f"{tag}-w{i}", seed)
            stores = self.store_addresses[i % len(self.stores):] + self.store_addresses[:i % len(self.stores)]
            return self._start("worker", "--base-dir", str(base_dir), "--worker-id", f"{tag}-w{i}", "--device",
                               "cuda" if device.startswith("cuda") else device, "--disk-cache-dir",
                               str(self.work / "caches" / f"{tag}-w{i}"), "--store-addresses", ",".join(stores),
                               *HEARTBEAT_FLAGS, *worker_flags, env=env, timeout_s=timeout_s)

        with concurrent.futures.ThreadPoolExecutor(num) as pool:
            futures = [pool.submit(one, i) for i in range(num)]
            started, failed = [], None
            for f in futures:
                try:
                    started.append(f.result())
                except RuntimeError as exc:
                    failed = failed or exc
        self.workers = started
        if failed is not None:
            self.stop_workers()
            raise failed
        return started

    def stop_workers(self) -> None:
        """Stop the workers and drop their caches; a worker that had to be killed did not unregister: wait out its
        heartbeat (the schedulers must not route to it)."""
        codes = self._stop(self.workers, timeout_s=60)
        self.workers = []
        shutil.rmtree(self.work / "caches", ignore_errors=True)
        time.sleep(HEARTBEAT_TTL_S + 0.5 if any(c == -signal.SIGKILL for c in codes) else 0.5)

    def scrape(self, procs: list[Proc]) -> list[dict]:
        """The /metrics samples of each process (an empty dict for one that does not answer)."""
        out = []
        for proc in procs:
            try:
                out.append(scrape(self.metrics_port[proc.address]))
            except OSError:
                out.append({})
        return out

    def cpu(self) -> dict[str, list[float]]:
        """CPU seconds used so far per role and service, child processes included: {"scheduler": [...], ...}."""
        return {role: [tree_cpu_seconds(p.popen.pid) for p in procs]
                for role, procs in (("scheduler", self.schedulers), ("store", self.stores), ("worker", self.workers))}

    def log_tails(self, num_chars: int = 3000) -> str:
        """The end of every service log, for a report when something went wrong."""
        parts = [f"==== {p.name} {p.address} ({p.log_path.name}) ====\n{p.log_tail(num_chars)}" for p in self.launcher.procs]
        return "\n".join(parts)

    def close(self) -> None:
        self.launcher.stop_all()
        stop(self.redis)
