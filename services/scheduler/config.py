"""Scheduler configuration: flags and DELTAZIP_* env vars, validated once in main()."""

import argparse
from dataclasses import dataclass

from deltazip.metrics import add_metrics_flag, validate_metrics_port
from deltazip.rpc.flags import add_common_flags, env_default, validate_common


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
    metrics_port: int = 0  # Prometheus /metrics, 0 = off

    def __post_init__(self) -> None:
        validate_common(self.host, self.port, self.redis_url, self.log_level, self.grace_s)
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts {self.max_attempts} must be >= 1")
        if self.max_tokens_limit < 1:
            raise ValueError(f"--max-tokens-limit {self.max_tokens_limit} must be >= 1")
        if self.affinity_slack < 0:
            raise ValueError(f"--affinity-slack {self.affinity_slack} must be >= 0")
        if self.prefetch_timeout_s <= 0 or self.rate_tau_s <= 0:
            raise ValueError("--prefetch-timeout-s and --rate-tau-s must be positive")
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
    add_metrics_flag(parser)
    args = parser.parse_args(argv)
    return SchedulerConfig(
        host=args.host, port=args.port, advertise=args.advertise, redis_url=args.redis_url, log_level=args.log_level,
        grace_s=args.grace_s, base_name=args.base_name, max_attempts=args.max_attempts,
        max_tokens_limit=args.max_tokens_limit, affinity_slack=args.affinity_slack,
        prefetch_timeout_s=args.prefetch_timeout_s, rate_tau_s=args.rate_tau_s,
        metrics_port=args.metrics_port,
    )
