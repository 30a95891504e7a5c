"""Flags every service shares; each defaults to its `DELTAZIP_*` env var. Used only by services' config.py."""

import argparse
import os
import socket


def env_default(name: str, default: str) -> str:
    """The value of env var `name`, or `default`."""
    return os.environ.get(name, default)


def add_common_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """--host --port --advertise --redis-url --log-level --grace-s."""
    parser.add_argument("--host", default=env_default("DELTAZIP_HOST", "0.0.0.0"), help="bind address (DELTAZIP_HOST)")
    parser.add_argument("--port", type=int, default=int(env_default("DELTAZIP_PORT", str(default_port))),
                        help="listen port, 0 = any free port (DELTAZIP_PORT)")
    parser.add_argument("--advertise", default=env_default("DELTAZIP_ADVERTISE", ""),
                        help="host:port others use to reach this process; default hostname:port (DELTAZIP_ADVERTISE)")
    parser.add_argument("--redis-url", default=env_default("DELTAZIP_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="shared cluster state (DELTAZIP_REDIS_URL)")
    parser.add_argument("--log-level", default=env_default("DELTAZIP_LOG_LEVEL", "info"), help="(DELTAZIP_LOG_LEVEL)")
    parser.add_argument("--grace-s", type=float, default=float(env_default("DELTAZIP_GRACE_S", "5")),
                        help="seconds in-flight calls get to finish on SIGTERM (DELTAZIP_GRACE_S)")


def advertise_address(host: str, port: int, advertise: str) -> str:
    """Address to publish in Redis: the explicit one, else the bind host (hostname for wildcard binds)."""
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def validate_common(host: str, port: int, redis_url: str, log_level: str, grace_s: float) -> None:
    """ValueError naming the bad flag."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range 0..65535")
    if not host:
        raise ValueError("--host must not be empty")
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--redis-url {redis_url!r} must start with redis://, rediss:// or unix://")
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError(f"--log-level {log_level!r}: use debug, info, warning, error or critical")
    if grace_s < 0:
        raise ValueError(f"--grace-s {grace_s} must be >= 0")
