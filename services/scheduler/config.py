"""Scheduler configuration: flags and DELTAZIP_* env vars, validated once in main()."""

import argparse
import os
import socket
from dataclasses import dataclass

from deltazip.metrics import add_metrics_flag, validate_metrics_port
from deltazip.rpc.flags import (add_auth_flag, add_common_flags, add_tls_flags, env_default, tls_kwargs, tls_settings,
                                validate_common)
from deltazip.security.tokens import validate_tokens_file


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    advertise: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: str = "info"
    grace_s: float = 5.0
    base_name: str = ""  # served as the base even before a worker publishes dz:base
    max_attempts: int = 3  # workers tried per request before giving up (only before the first token)
    max_tokens_limit: int = 32768
    affinity_slack: int = 4  # a worker holding the delta wins unless it has this many more requests than the idlest
    prefetch_timeout_s: float = 120.0
    rate_tau_s: float = 10.0
    scheduler_id: str = ""  # '' = hostname-pid (holder of prefetch leases, in logs)
    max_queue_per_worker: int = 32  # requests relayed to one worker at once; beyond, try another (0 = unbounded)
    max_queued_tokens_per_worker: int = 0  # skip a worker whose published queued_tokens reach this (0 = off)
    retry_after_s: float = 1.0  # advice in RESOURCE_EXHAUSTED when every worker's queue is full
    lease_s: float = 10.0  # a queue place not renewed this long (scheduler died) is freed
    worker_check_s: float = 1.0  # while waiting on a worker, check its heartbeat this often
    prefetch_interval_s: float = 0.5  # burst detector period (0 = no automatic prefetch)
    burst_rate_per_s: float = 2.0  # a model arriving at least this fast is bursting
    burst_pending: int = 8  # ... or with this many requests routed but not started
    prefetch_rate_per_worker: float = 4.0  # arrivals/s one worker absorbs: holders wanted = rate / this
    prefetch_window_s: float = 5.0  # one prefetch decision per model per window, over all schedulers
    prefetch_tier: str = "device"  # where burst prefetch puts a delta: device | host
    metrics_port: int = 0  # Prometheus /metrics, 0 = off
    tls_cert: str = ""  # PEM certificate served; '' = plaintext
    tls_key: str = ""
    tls_ca: str = ""  # CA of the other services' certificates; set = dial them over TLS
    tls_server_name: str = ""  # name checked in dialled servers' certificates
    tls_require_client_cert: int = 0  # 1 = mutual TLS
    auth_tokens: str = ""  # tokens file; '' = no auth (loopback dev only)
    processes: int = 1  # processes serving --port together (SO_REUSEPORT), each one asyncio thread

    def __post_init__(self) -> None:
        validate_common(self.host, self.port, self.redis_url, self.log_level, self.grace_s)
        tls_settings(self)
        validate_tokens_file(self.auth_tokens)
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts {self.max_attempts} must be >= 1")
        if self.max_tokens_limit < 1:
            raise ValueError(f"--max-tokens-limit {self.max_tokens_limit} must be >= 1")
        if self.affinity_slack < 0:
            raise ValueError(f"--affinity-slack {self.affinity_slack} must be >= 0")
        for name in ("prefetch_timeout_s", "rate_tau_s", "retry_after_s", "lease_s", "worker_check_s",
                     "burst_rate_per_s", "prefetch_rate_per_worker", "prefetch_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_queue_per_worker", "max_queued_tokens_per_worker", "prefetch_interval_s", "burst_pending"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.prefetch_tier not in ("device", "host"):
            raise ValueError(f"--prefetch-tier must be device or host, got {self.prefetch_tier!r}")
        if self.processes < 1:
            raise ValueError(f"--processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.port == 0:
            raise ValueError("--processes > 1 needs a fixed --port: the processes share it")
        if self.lease_s <= self.worker_check_s:
            raise ValueError("--lease-s must exceed --worker-check-s: leases are renewed at each check")
        validate_metrics_port(self.metrics_port)


def parse_config(argv: list[str] | None = None) -> SchedulerConfig:
    """Build the config from flags, whose defaults come from env vars."""
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description="DeltaZip scheduler")
    add_common_flags(parser, default_port=50051)
    parser.add_argument("--base-name", default=env_default("DELTAZIP_BASE_NAME", ""),
                        help="name of the base model, if workers have not published it yet (DELTAZIP_BASE_NAME)")
    parser.add_argument("--max-attempts", type=int, default=int(env_default("DELTAZIP_MAX_ATTEMPTS", "3")))
    parser.add_argument("--max-tokens-limit", type=int, default=int(env_default("DELTAZIP_MAX_TOKENS_LIMIT", "32768")))
    parser.add_argument("--affinity-slack", type=int, default=int(env_default("DELTAZIP_AFFINITY_SLACK", "4")))
    parser.add_argument("--prefetch-timeout-s", type=float, default=float(env_default("DELTAZIP_PREFETCH_TIMEOUT_S", "120")))
    parser.add_argument("--rate-tau-s", type=float, default=float(env_default("DELTAZIP_RATE_TAU_S", "10")))
    parser.add_argument("--scheduler-id", default=env_default("DELTAZIP_SCHEDULER_ID", ""))
    parser.add_argument("--prefetch-tier", default=env_default("DELTAZIP_PREFETCH_TIER", "device"),
                        help="where burst prefetch loads a delta: device or host (DELTAZIP_PREFETCH_TIER)")
    for name, kind, default, doc in _TUNING:
        env = "DELTAZIP_" + name.upper()
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=kind(env_default(env, str(default))),
                            help=f"{doc} ({env})")
    add_metrics_flag(parser)
    add_tls_flags(parser)
    add_auth_flag(parser)
    args = parser.parse_args(argv)
    return SchedulerConfig(
        host=args.host, port=args.port, advertise=args.advertise, redis_url=args.redis_url, log_level=args.log_level,
        grace_s=args.grace_s, base_name=args.base_name, max_attempts=args.max_attempts,
        max_tokens_limit=args.max_tokens_limit, affinity_slack=args.affinity_slack,
        prefetch_timeout_s=args.prefetch_timeout_s, rate_tau_s=args.rate_tau_s,
        scheduler_id=args.scheduler_id or f"{socket.gethostname()}-{os.getpid()}", prefetch_tier=args.prefetch_tier,
        **{name: getattr(args, name) for name, *_ in _TUNING},
        metrics_port=args.metrics_port, **tls_kwargs(args),
    )


_TUNING = (
    ("max_queue_per_worker", int, 32, "requests relayed to one worker at once (0 = unbounded)"),
    ("max_queued_tokens_per_worker", int, 0, "skip a worker whose queued tokens reach this (0 = off)"),
    ("retry_after_s", float, 1.0, "retry advice when every worker is full"),
    ("lease_s", float, 10.0, "queue place lease, renewed while relaying"),
    ("worker_check_s", float, 1.0, "how often a relayed worker's heartbeat is checked"),
    ("prefetch_interval_s", float, 0.5, "burst detector period; 0 = no automatic prefetch"),
    ("burst_rate_per_s", float, 2.0, "arrival rate that counts as a burst"),
    ("burst_pending", int, 8, "pending requests that count as a burst"),
    ("prefetch_rate_per_worker", float, 4.0, "arrivals/s one worker absorbs"),
    ("prefetch_window_s", float, 5.0, "one prefetch per model per window"),
    ("processes", int, 1, "processes serving --port together (SO_REUSEPORT): one relays ~100 req/s, a core each; "
                          "process i serves metrics on --metrics-port + i"),
)
