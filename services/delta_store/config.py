"""Delta store configuration: flags and DELTAZIP_* env vars, validated once in main()."""

import argparse
import os
import uuid
from dataclasses import dataclass

from deltazip.metrics import add_metrics_flag, validate_metrics_port
from deltazip.rpc.flags import (add_auth_flag, add_common_flags, add_tls_flags, env_default, tls_kwargs, tls_settings,
                                validate_common)
from deltazip.security.tokens import validate_tokens_file

GiB = 1024**3


@dataclass(frozen=True, slots=True)
class StoreConfig:
    root: str
    host: str = "0.0.0.0"
    port: int = 50052
    advertise: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    log_level: str = "info"
    grace_s: float = 5.0
    store_id: str = ""
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    max_artifact_bytes: int = 256 * GiB
    stale_staging_s: float = 3600.0
    metrics_port: int = 0  # Prometheus /metrics, 0 = off
    tls_cert: str = ""  # PEM certificate served; '' = plaintext
    tls_key: str = ""
    tls_ca: str = ""  # CA of the other services' certificates; set = dial them over TLS
    tls_server_name: str = ""  # name checked in dialled servers' certificates
    tls_require_client_cert: int = 0  # 1 = mutual TLS
    auth_tokens: str = ""  # tokens file; '' = no auth (loopback dev only)

    def __post_init__(self) -> None:
        validate_common(self.host, self.port, self.redis_url, self.log_level, self.grace_s)
        tls_settings(self)
        validate_tokens_file(self.auth_tokens)
        if not self.root:
            raise ValueError("--root is required: the directory that holds the artifacts (DELTAZIP_STORE_ROOT)")
        if not self.store_id:
            raise ValueError("--store-id must not be empty")
        if not 0 < self.heartbeat_s < self.heartbeat_ttl_s:
            raise ValueError(f"need 0 < --heartbeat-s ({self.heartbeat_s}) < --heartbeat-ttl-s ({self.heartbeat_ttl_s})")
        if self.max_artifact_bytes <= 0:
            raise ValueError("--max-artifact-bytes must be positive")
        validate_metrics_port(self.metrics_port)


def parse_config(argv: list[str] | None = None) -> StoreConfig:
    """Build the config from flags, whose defaults come from env vars."""
    parser = argparse.ArgumentParser(prog="python -m services.delta_store", description="DeltaZip delta store")
    add_common_flags(parser, default_port=50052)
    parser.add_argument("--root", default=env_default("DELTAZIP_STORE_ROOT", ""), help="artifact dir (DELTAZIP_STORE_ROOT)")
    parser.add_argument("--store-id", default=env_default("DELTAZIP_STORE_ID", ""),
                        help="id in Redis; default hostname-pid-random (DELTAZIP_STORE_ID)")
    parser.add_argument("--heartbeat-s", type=float, default=float(env_default("DELTAZIP_HEARTBEAT_S", "2")))
    parser.add_argument("--heartbeat-ttl-s", type=float, default=float(env_default("DELTAZIP_HEARTBEAT_TTL_S", "10")))
    parser.add_argument("--max-artifact-bytes", type=int,
                        default=int(env_default("DELTAZIP_MAX_ARTIFACT_BYTES", str(256 * GiB))))
    add_metrics_flag(parser)
    add_tls_flags(parser)
    add_auth_flag(parser)
    args = parser.parse_args(argv)
    store_id = args.store_id or f"store-{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return StoreConfig(
        root=args.root, host=args.host, port=args.port, advertise=args.advertise, redis_url=args.redis_url,
        log_level=args.log_level, grace_s=args.grace_s, store_id=store_id, heartbeat_s=args.heartbeat_s,
        heartbeat_ttl_s=args.heartbeat_ttl_s, max_artifact_bytes=args.max_artifact_bytes,
        metrics_port=args.metrics_port, **tls_kwargs(args),
    )
