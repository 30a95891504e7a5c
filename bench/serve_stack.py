"""The serving benchmark's stack: redis + delta store + schedulers as processes, one worker per mode at a time."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

PUSH_PARALLEL = 4  # pushes in flight: one alone leaves the store's disk and the link mostly idle (hashing, framing)


class Stack:
    """redis + delta store + scheduler as processes; workers started and stopped per mode.

    `ports`: where every process's port comes from (default: free ports picked by the OS; a PortRange for stacks
    run side by side). `keep_disk_cache`: the workers of all modes share one disk cache, so a later mode starts
    with every delta an earlier one fetched on local disk (as a long-running worker's cache would hold them).
    """

    def __init__(self, work: Path, worker_flags: list[str], num_schedulers: int = 1, keep_disk_cache: bool = False,
                 ports: Callable[[], int] | None = None):
        from deltazip.rpc.ports import free_port
        from deltazip.stack import Launcher, start_redis

        ports = ports or free_port
        self.redis = start_redis(work / "redis", port=ports())
        self.launcher = Launcher(f"redis://{self.redis.address}/0", work / "logs", ports=ports)
        self.work, self.worker_flags, self.keep_disk_cache = work, worker_flags, keep_disk_cache
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

    def stored_names(self) -> set[str]:
        with self._client() as c:
            return {m.name for m in c.stored_models()}

    def push_one(self, name: str, path: Path) -> None:
        with self._client() as c:
            c.push(path, name, progress=False)

    def _client(self):
        from deltazip.client import Client

        return Client(self.scheduler.address, store=self.store.address, timeout_s=3600)

    def kept_cache(self) -> Path:
        """The disk cache every mode's worker shares (`keep_disk_cache`)."""
        return self.work / "worker-cache-kept"

    def link_into_cache(self, name: str) -> None:
        """Put the store's copy of `name` into the kept worker disk cache as hard links (no second copy on disk),
        as if a worker had fetched it: the artifact's files without the store's own index, published by one
        rename like a fetch. The worker finds it at start-up (ON_DISK) and reads or evicts it like a fetched one."""
        from services.delta_store.storage import FILES_INDEX

        src = self.work / "store" / name
        final = self.kept_cache() / name
        partial = self.kept_cache() / ".partial" / name
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial, copy_function=os.link, ignore=shutil.ignore_patterns(FILES_INDEX))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)

    def start_worker(self, base_dir: Path, mode: str, mode_flags: list[str]):
        cache = self.kept_cache() if self.keep_disk_cache else self.work / f"worker-cache-{mode}-{time.monotonic_ns()}"
        return self.launcher.start("worker", "--base-dir", str(base_dir), "--mode", mode, "--disk-cache-dir",
                                   str(cache), "--heartbeat-s", "0.5", "--heartbeat-ttl-s", "2", *self.worker_flags,
                                   *mode_flags, timeout_s=1800)

    def stop_worker(self, proc) -> None:
        from deltazip.stack import stop

        stop(proc, timeout_s=60)
        self.launcher.procs.remove(proc)
        for cache in [] if self.keep_disk_cache else self.work.glob("worker-cache-*"):
            shutil.rmtree(cache, ignore_errors=True)  # a 7B run's caches would fill the disk mode after mode
        time.sleep(2.5)  # past the heartbeat TTL: the scheduler must not route to it any more

    def close(self) -> None:
        from deltazip.stack import stop

        self.launcher.stop_all()
        stop(self.redis)
