"""What the scale-out benchmark measures besides client latencies: store and worker bytes, CPU per role,
routing tiers of a burst, and the burst workload itself.

Store throughput comes from the stores' own counter (deltazip_store_bytes_total{direction="fetch"}) sampled
every `period_s` while a run lasts: mean over the run, and the peak over any 1 s window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from bench.scaleout_stack import ScaleoutStack
from deltazip.metrics import scrape, total
from bench.workload import Request, WorkloadConfig, generate

STORE_FETCH = ("deltazip_store_bytes_total", {"direction": "fetch"})


class StoreSampler:
    """Samples every store's bytes-fetched counter in a thread: `with StoreSampler(stack) as s: ...; s.summary()`."""

    def __init__(self, stack: ScaleoutStack, period_s: float = 0.5):
        self.ports = [stack.metrics_port[a] for a in stack.store_addresses]
        self.period_s = period_s
        self.samples: list[tuple[float, list[float]]] = []  # (seconds from start, bytes fetched so far per store)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> list[float]:
        values = []
        for port in self.ports:
            try:
                values.append(total(scrape(port), STORE_FETCH[0], **STORE_FETCH[1]))
            except OSError:  # a store that died mid-run: its counter is gone with it
                values.append(float("nan"))
        return values

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic() - self._t0, self._read()))
            if self._stop.wait(self.period_s):
                break

    def __enter__(self) -> StoreSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.samples.append((time.monotonic() - self._t0, self._read()))

    def summary(self) -> dict:
        """Bytes each store served in the run, mean and peak (1 s window) bytes/s of all stores together."""
        if len(self.samples) < 2:
            return {}
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        per_store = [b - a for a, b in zip(first, last)]
        sums = [(t, sum(v for v in vals if v == v)) for t, vals in self.samples]
        peak, j = 0.0, 0
        for i in range(1, len(sums)):  # widest rate over windows of >= 1 s ending at sample i
            while j < i - 1 and sums[i][0] - sums[j + 1][0] >= 1.0:
                j += 1
            dt = sums[i][0] - sums[j][0]
            if dt >= 1.0 or (j == 0 and i == len(sums) - 1 and dt > 0):  # a run shorter than 1 s: its mean
                peak = max(peak, (sums[i][1] - sums[j][1]) / dt)
        served = sum(b for b in per_store if b == b)
        return {"store_bytes_served": served, "store_bytes_served_per_store": per_store,
                "store_bytes_per_s_mean": served / max(t1 - t0, 1e-9), "store_bytes_per_s_peak_1s": peak,
                "store_series": [[round(t, 2), *[round(v) if v == v else None for v in vals]] for t, vals in self.samples]}


def worker_stats(before: list[dict], after: list[dict], wall_s: float | None = None) -> dict:
    """Fetch bytes/seconds, host and device loads, batch occupancy and step time of the workers between two scrapes
    (one dict per worker); `wall_s`, the time between them, gives the mean step time (idle steps included)."""
    def diff(name: str, i: int, **labels) -> float:
        return total(after[i], name, **labels) - total(before[i], name, **labels)

    per_worker = []
    for i in range(len(after)):
        steps = diff("deltazip_batch_sequences_count", i)
        per_worker.append({
            "fetch_bytes": diff("deltazip_delta_bytes_total", i, stage="fetch"),
            "fetch_s": diff("deltazip_delta_seconds_sum", i, stage="fetch"),
            "num_fetches": diff("deltazip_delta_seconds_count", i, stage="fetch"),
            "host_load_s": diff("deltazip_delta_seconds_sum", i, stage="host_load"),
            "num_host_loads": diff("deltazip_delta_seconds_count", i, stage="host_load"),
            "device_load_s": diff("deltazip_delta_seconds_sum", i, stage="device_load"),
            "num_device_loads": diff("deltazip_delta_seconds_count", i, stage="device_load"),
            "num_steps": steps,
            "batch_mean": diff("deltazip_batch_sequences_sum", i) / steps if steps else 0.0,
            "deltas_per_step_mean": diff("deltazip_batch_distinct_deltas_sum", i) / steps if steps else 0.0,
            "step_ms_mean": 1e3 * wall_s / steps if steps and wall_s else None,
            "tokens": diff("deltazip_generated_tokens_total", i),
        })
    fetch_bytes = sum(w["fetch_bytes"] for w in per_worker)
    fetch_s = sum(w["fetch_s"] for w in per_worker)
    return {"worker_fetch_bytes": fetch_bytes, "worker_fetch_s": fetch_s,
            "worker_fetch_bytes_per_s": fetch_bytes / fetch_s if fetch_s else None,  # per fetch stream
            "num_worker_fetches": sum(w["num_fetches"] for w in per_worker), "workers": per_worker}


def cpu_util(before: dict[str, list[float]], after: dict[str, list[float]], wall_s: float) -> dict:
    """Busy cores per process of each role over `wall_s` (1.0 = one core all the time)."""
    return {f"cpu_{role}": [round((b - a) / wall_s, 3) for a, b in zip(before[role], after[role])]
            for role in after if len(before.get(role, [])) == len(after[role])}


def request_tiers(stack: ScaleoutStack, request_ids: list[str]) -> list[str]:
    """Where each request's delta was when it was routed (device|host|disk|remote; '' when not recorded)."""
    import redis

    from deltazip.cluster import keys

    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        pipe = client.pipeline(transaction=False)
        for rid in request_ids:
            pipe.hget(keys.request(rid), "tier")
        return [t or "" for t in pipe.execute()]
    finally:
        client.close()


def count_log_events(stack: ScaleoutStack, event: str, model: str) -> int:
    """Lines of the current schedulers' logs with `event` for `model` (e.g. burst_detected)."""
    count = 0
    for proc in stack.schedulers:
        for line in proc.log_path.read_text(errors="replace").splitlines():
            count += f'"{event}"' in line and f'"{model}"' in line
    return count


def burst_workload(background: WorkloadConfig, cold_model: str, burst_size: int, burst_at_s: float,
                   burst_span_s: float) -> list[Request]:
    """`background` plus `burst_size` requests for `cold_model` arriving over [burst_at_s, +burst_span_s]
    (Poisson), ids burst-NNNN; in arrival order."""
    reqs = generate(background)
    if burst_size:
        cfg = replace(background, models=(cold_model,), num_requests=burst_size,
                      rate_rps=burst_size / max(burst_span_s, 1e-3), arrival="poisson", seed=background.seed + 7)
        reqs += [Request(f"burst-{i:04d}", r.prompt, burst_at_s + r.timestamp, r.model, r.min_tokens, r.max_tokens)
                 for i, r in enumerate(generate(cfg))]
    return sorted(reqs, key=lambda r: r.timestamp)
