"""Open-loop replay split over several client processes, each talking to one scheduler replica.

One asyncio client in one process is itself a bottleneck at a few thousand streamed tokens/s, and a
scale-out run must load the workers, not the driver. Request i goes to client i % num_clients, client c
talks to scheduler c % num_schedulers; all clients share one clock (time.monotonic of timestamp 0), so
the merged outcomes are one open-loop run. Each client reports the CPU seconds it used.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import asdict

from bench.replay import Outcome, replay
from bench.workload import Request

START_DELAY_S = 0.3  # from "every client is ready" to timestamp 0
READY_TIMEOUT_S = 180.0


def _client_main(address: str, requests: list[dict], timeout_s: float, id_prefix: str, sync, done_counter,
                 results) -> None:
    """One client process: import, say ready, wait for the shared start, replay its share, then put
    (outcomes, wall_s, cpu_s) or an error string on `results`."""
    ready, go, start_at = sync

    def on_done() -> None:
        with done_counter.get_lock():
            done_counter.value += 1

    try:
        import deltazip.client  # noqa: F401  (a slow import must not delay the first requests)

        reqs = [Request(**r) for r in requests]
        with ready.get_lock():
            ready.value += 1
        if not go.wait(READY_TIMEOUT_S):
            raise TimeoutError("the driver never gave the start")
        cpu0 = time.process_time()
        outcomes, wall_s, _ = asyncio.run(replay(address, reqs, timeout_s, "", id_prefix=id_prefix,
                                                 start_at=start_at.value, on_done=on_done))
        results.put(([asdict(o) for o in outcomes], wall_s, time.process_time() - cpu0))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which fails the run with it)
        results.put(f"{type(exc).__name__}: {exc}")


def _start_when_ready(procs, sync, results) -> float:
    """Wait until every client has imported and is waiting, then give them timestamp 0 (time.monotonic())."""
    ready, go, start_at = sync
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready.value < len(procs):
        if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
            try:
                why = results.get(timeout=1.0)
            except queue.Empty:
                why = "no message"
            raise RuntimeError(f"only {ready.value} of {len(procs)} client processes got ready: {why}")
        time.sleep(0.02)
    start_at.value = time.monotonic() + START_DELAY_S
    go.set()
    return start_at.value


class _Progress:
    """A tqdm bar on a terminal; a plain line every `every_s` otherwise (a log file stays readable)."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0):
        self.total, self.desc, self.every_s, self.shown, self.bar = total, desc, every_s, 0, None
        self.last_print = time.monotonic()
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="req", leave=False)
            except ImportError:
                pass

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.shown)
        elif time.monotonic() - self.last_print >= self.every_s:
            self.last_print = time.monotonic()
            print(f"  {self.desc}: {done}/{self.total} requests done", flush=True)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def split_replay(addresses: list[str], requests: list[Request], timeout_s: float, desc: str, num_clients: int,
                 id_prefix: str, on_start=None) -> tuple[list[Outcome], float, dict]:
    """Replay `requests` from `num_clients` processes over `addresses`; returns merged outcomes (in request
    order), the longest client wall time and {"client_cpu_s": [...]}. `on_start()` is called at timestamp 0."""
    assert addresses and num_clients >= 1
    ctx = mp.get_context("spawn")  # no fork: the parent may hold grpc channels and threads
    done_counter, results = ctx.Value("i", 0), ctx.Queue()
    sync = (ctx.Value("i", 0), ctx.Event(), ctx.Value("d", 0.0))  # ready count, go, timestamp 0
    shares = [[asdict(r) for i, r in enumerate(requests) if i % num_clients == c] for c in range(num_clients)]
    procs = [ctx.Process(target=_client_main, daemon=True,
                         args=(addresses[c % len(addresses)], shares[c], timeout_s, id_prefix, sync, done_counter,
                               results)) for c in range(num_clients) if shares[c]]
    for p in procs:
        p.start()
    progress, got = _Progress(len(requests), desc), []
    try:
        start_at = _start_when_ready(procs, sync, results)
        if on_start is not None:
            time.sleep(max(0.0, start_at - time.monotonic()))
            on_start()
        deadline = start_at + (requests[-1].timestamp if requests else 0) + timeout_s + 60
        while len(got) < len(procs):
            try:
                got.append(results.get(timeout=0.5))
            except queue.Empty:
                if time.monotonic() > deadline or not any(p.is_alive() for p in procs) and results.empty():
                    raise RuntimeError(f"{desc}: {len(procs) - len(got)} client process(es) gave no result")
            progress.update(done_counter.value)
    finally:
        progress.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = [g for g in got if isinstance(g, str)]
    if errors:
        raise RuntimeError(f"{desc}: a client failed: {errors[0]}")
    by_id = {o["id"]: Outcome(**o) for outs, _, _ in got for o in outs}
    return ([by_id[r.id] for r in requests], max(w for _, w, _ in got),
            {"client_cpu_s": [round(c, 2) for _, _, c in got]})
