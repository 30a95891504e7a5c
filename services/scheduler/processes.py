"""--processes N: one scheduler spread over N processes that share its port.

A scheduler is one asyncio thread, and relaying costs it CPU per token chunk (gRPC in, gRPC out): on the 4-GPU
scale-out run two single-process schedulers each used a whole core at 150 req/s and capped the cluster
(docs/scaleout.md). The scheduler holds no request state (Redis does), so N processes can serve one port:
SO_REUSEPORT makes the kernel spread new client connections over them (a client's calls share its connection, so
spreading needs several clients, as a service has). Process 0 is the one started; it spawns 1..N-1, restarts one
that dies, and stops them all when it stops. Children die with it even on SIGKILL (PR_SET_PDEATHSIG, and a
watchdog where that is missing). Each process has its own scheduler id (`<id>-p<i>`, the holder of prefetch
leases) and, with --metrics-port P, serves metrics on P + i.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import multiprocessing
import os
import signal
import time

from deltazip.child_process import die_with_parent
from deltazip.logs import configure_logging, get_logger

log = get_logger("scheduler")


class ProcessGroup:
    """Children 1..N-1 of a --processes scheduler (process 0 is the caller)."""

    def __init__(self, config, target: str, restart_pause_s: float = 1.0):
        """`target`: "module:coroutine function" each child runs with its config (imported there by name)."""
        self.config, self.target, self.restart_pause_s = config, target, restart_pause_s
        self.ctx = multiprocessing.get_context("spawn")
        self.children: dict[int, multiprocessing.Process] = {}
        self._stopping = False
        for i in range(1, config.processes):
            self._start(i)

    def config_of(self, i: int):
        """Process i's config: its own scheduler id and metrics port."""
        return dataclasses.replace(self.config, scheduler_id=f"{self.config.scheduler_id}-p{i}",
                                   metrics_port=self.config.metrics_port + i if self.config.metrics_port else 0)

    def _start(self, i: int) -> None:
        proc = self.ctx.Process(target=_child_main, args=(self.target, self.config_of(i), os.getpid()),
                                name=f"scheduler-p{i}", daemon=False)
        proc.start()
        self.children[i] = proc
        log.info("scheduler_process_started", process=i, pid=proc.pid)

    async def watch(self, interval_s: float = 1.0) -> None:
        """Restart a child that exited while the group runs."""
        while True:
            await asyncio.sleep(interval_s)
            for i, proc in list(self.children.items()):
                if not self._stopping and not proc.is_alive():
                    log.warning("scheduler_process_died", process=i, pid=proc.pid, exit_code=proc.exitcode)
                    await asyncio.sleep(self.restart_pause_s)
                    if not self._stopping:
                        self._start(i)

    def stop(self) -> None:
        """SIGTERM every child (each drains like a single scheduler does), then wait; SIGKILL past the grace."""
        self._stopping = True
        for proc in self.children.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + self.config.grace_s + 5.0
        for proc in self.children.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)


def _child_main(target: str, config, parent_pid: int) -> None:
    die_with_parent(parent_pid, lambda: os.kill(os.getpid(), signal.SIGTERM))  # drain like a SIGTERMed scheduler
    module, name = target.split(":")
    serve = getattr(importlib.import_module(module), name)
    configure_logging(config.log_level, service="scheduler")
    asyncio.run(serve(config))
