"""Prometheus metrics for every DeltaZip process: one registry, the metric families, and the /metrics server.

Services record through the objects below (label values are short and bounded: model names, tiers, status
codes) and expose them with `start_metrics_server(port)` on `--metrics-port` / `DELTAZIP_METRICS_PORT`
(0 = off). Metric names carry their unit (`_seconds`, `_bytes`), as Prometheus recommends.
"""

import argparse
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TRANSFER_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

# every gRPC method (through deltazip.rpc.errors.rpc_method) and every gateway HTTP route
REQUESTS = Counter("deltazip_requests_total", "Requests served, by method and final status code",
                   ["service", "method", "code"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("deltazip_queue_depth", "Requests waiting or running per model, as this process last saw it",
                    ["service", "model"], registry=REGISTRY)
TTFT_SECONDS = Histogram("deltazip_ttft_seconds", "Time from arrival to the first generated token",
                         ["service"], buckets=_LATENCY_BUCKETS_S, registry=REGISTRY)
TOKEN_LATENCY_SECONDS = Histogram("deltazip_token_latency_seconds", "Time per output token after the first",
                                  ["service"], buckets=_TOKEN_BUCKETS_S, registry=REGISTRY)
GENERATED_TOKENS = Counter("deltazip_generated_tokens_total", "Output tokens produced (rate() = tokens/s)",
                           ["service"], registry=REGISTRY)
RESIDENCY_LOOKUPS = Counter("deltazip_residency_lookups_total", "Delta lookups per residency tier: hit or miss",
                            ["tier", "result"], registry=REGISTRY)
DELTA_BYTES = Counter("deltazip_delta_bytes_total", "Delta bytes moved, by stage (fetch = store->disk, load = ->slot)",
                      ["stage"], registry=REGISTRY)
DELTA_SECONDS = Histogram("deltazip_delta_seconds", "Seconds per delta fetch / load", ["stage"],
                          buckets=_TRANSFER_BUCKETS_S, registry=REGISTRY)
BATCH_ROWS = Histogram("deltazip_batch_sequences", "Sequences per engine step (batch occupancy)",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
BATCH_DELTAS = Histogram("deltazip_batch_distinct_deltas", "Distinct deltas (base excluded) per engine step",
                         buckets=(0, 1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
STORE_BYTES = Counter("deltazip_store_bytes_total", "Bytes the delta store received (push) or sent (fetch)",
                      ["direction"], registry=REGISTRY)
KERNELS_WARMING = Gauge("deltazip_worker_kernels_warming", "1 while the worker has kernel warm-up work left (GEMM row "
                        "buckets, SBMM variants of its delta stacks; steps that meet it pay for it), else 0",
                        registry=REGISTRY)


def add_metrics_flag(parser: argparse.ArgumentParser) -> None:
    """--metrics-port (DELTAZIP_METRICS_PORT, default 0 = no /metrics endpoint)."""
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("DELTAZIP_METRICS_PORT", "0")),
                        help="serve Prometheus /metrics on this port, 0 = off (DELTAZIP_METRICS_PORT)")


def validate_metrics_port(port: int) -> None:
    """ValueError naming the flag."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port {port} is out of range 0..65535 (0 = off)")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> bool:
    """Serve /metrics from a daemon thread; returns False when `port` is 0 (off)."""
    if port == 0:
        return False
    start_http_server(port, addr=host, registry=REGISTRY)
    return True


def exposition() -> bytes:
    """The current metrics in Prometheus text format (for a process that serves HTTP itself)."""
    return generate_latest(REGISTRY)


def observe_stream_timing(service: str, start_s: float, first_token_s: float | None, end_s: float,
                          num_tokens: int) -> None:
    """TTFT, per-token latency and token count of one finished stream (times from time.monotonic())."""
    GENERATED_TOKENS.labels(service).inc(num_tokens)
    if first_token_s is None:
        return
    TTFT_SECONDS.labels(service).observe(first_token_s - start_s)
    if num_tokens > 1:
        TOKEN_LATENCY_SECONDS.labels(service).observe((end_s - first_token_s) / (num_tokens - 1))


class StreamTimer:
    """Times one token stream: `add(num_tokens)` per chunk, `finish()` once (records TTFT, per-token, count)."""

    __slots__ = ("service", "start_s", "first_s", "num_tokens", "done")

    def __init__(self, service: str):
        self.service, self.start_s, self.first_s, self.num_tokens, self.done = service, time.monotonic(), None, 0, False

    def add(self, num_tokens: int) -> None:
        if num_tokens and self.first_s is None:
            self.first_s = time.monotonic()
        self.num_tokens += num_tokens

    def finish(self) -> None:
        if not self.done:
            self.done = True
            observe_stream_timing(self.service, self.start_s, self.first_s, time.monotonic(), self.num_tokens)


def observe_batch(num_sequences: int, num_distinct_deltas: int) -> None:
    """Occupancy and delta mix of one engine step."""
    BATCH_ROWS.observe(num_sequences)
    BATCH_DELTAS.observe(num_distinct_deltas)


def observe_transfer(stage: str, num_bytes: int, seconds: float) -> None:
    """One delta fetch (store -> local disk), host load or device load."""
    DELTA_BYTES.labels(stage).inc(num_bytes)
    DELTA_SECONDS.labels(stage).observe(seconds)


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of http://host:port/metrics (tests and benchmarks read services so)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    """Sum of `name` over the scraped samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))
