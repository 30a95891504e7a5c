"""The serving benchmark's stack: redis + delta store + schedulers as processes, one worker per mode at a time."""

from __future__ import annotations

import shutil
import time
from pathlib import Path


class Stack:
    """redis + delta store + scheduler as processes; workers started and stopped per mode."""

    def __init__(self, work: Path, worker_flags: list[str], num_schedulers: int = 1):
        from deltazip.stack import Launcher, start_redis

        self.redis = start_redis(work / "redis")
        self.launcher = Launcher(f"redis://{self.redis.address}/0", work / "logs")
        self.work, self.worker_flags = work, worker_flags
        try:
            self.store = self.launcher.start("delta_store", "--root", str(work / "store"))
            # The benchmark measures the workers: let the scheduler relay every request rather than answer
            # RESOURCE_EXHAUSTED at its default 32 per worker (the worker queues beyond its batch itself).
            # Schedulers are stateless: several share the relaying, clients spread over them (--schedulers).
            self.schedulers = [self.launcher.start("scheduler", "--max-queue-per-worker", "4096")
                               for _ in range(num_schedulers)]
            self.scheduler = self.schedulers[0]
        except BaseException:
            self.close()
            raise

    def push(self, artifacts: dict[str, Path]) -> None:
        from deltazip.client import Client

        with Client(self.scheduler.address, store=self.store.address, timeout_s=3600) as client:
            stored = {m.name for m in client.stored_models()}
            for name, path in artifacts.items():
                if name not in stored:
                    client.push(path, name, progress=False)

    def start_worker(self, base_dir: Path, mode: str, mode_flags: list[str]):
        cache = self.work / f"worker-cache-{mode}-{time.monotonic_ns()}"
        return self.launcher.start("worker", "--base-dir", str(base_dir), "--mode", mode, "--disk-cache-dir",
                                   str(cache), "--heartbeat-s", "0.5", "--heartbeat-ttl-s", "2", *self.worker_flags,
                                   *mode_flags, timeout_s=1800)

    def stop_worker(self, proc) -> None:
        from deltazip.stack import stop

        stop(proc, timeout_s=60)
        self.launcher.procs.remove(proc)
        for cache in self.work.glob("worker-cache-*"):  # a 7B run's caches would fill the disk mode after mode
            shutil.rmtree(cache, ignore_errors=True)
        time.sleep(2.5)  # past the heartbeat TTL: the scheduler must not route to it any more

    def close(self) -> None:
        from deltazip.stack import stop

        self.launcher.stop_all()
        stop(self.redis)
