"""Flags every service shares; each defaults to its `DELTAZIP_*` env var. Used only by services' config.py."""

import argparse
import os
import socket

from deltazip.security.tls import TlsSettings


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


def validate_port_and_log_level(port: int, log_level: str) -> None:
    """ValueError naming --port or --log-level (every service, gRPC or HTTP, has both)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range 0..65535")
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError(f"--log-level {log_level!r}: use debug, info, warning, error or critical")


def validate_common(host: str, port: int, redis_url: str, log_level: str, grace_s: float) -> None:
    """ValueError naming the bad flag."""
    validate_port_and_log_level(port, log_level)
    if not host:
        raise ValueError("--host must not be empty")
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--redis-url {redis_url!r} must start with redis://, rediss:// or unix://")
    if grace_s < 0:
        raise ValueError(f"--grace-s {grace_s} must be >= 0")


def add_tls_flags(parser: argparse.ArgumentParser, server: bool = True) -> None:
    """--tls-cert --tls-key --tls-ca --tls-server-name, and for gRPC servers --tls-require-client-cert."""
    cert_help = ("PEM certificate served (and presented as client certificate); '' = plaintext" if server
                 else "PEM client certificate presented for mutual TLS")
    parser.add_argument("--tls-cert", default=env_default("DELTAZIP_TLS_CERT", ""), help=f"{cert_help} (DELTAZIP_TLS_CERT)")
    parser.add_argument("--tls-key", default=env_default("DELTAZIP_TLS_KEY", ""),
                        help="PEM private key of --tls-cert (DELTAZIP_TLS_KEY)")
    parser.add_argument("--tls-ca", default=env_default("DELTAZIP_TLS_CA", ""),
                        help="PEM CA that signs the other services' certificates; set = dial them over TLS (DELTAZIP_TLS_CA)")
    parser.add_argument("--tls-server-name", default=env_default("DELTAZIP_TLS_SERVER_NAME", ""),
                        help="name checked in dialled servers' certificates; '' = the dialled host (DELTAZIP_TLS_SERVER_NAME)")
    if not server:
        return
    parser.add_argument("--tls-require-client-cert", type=int,
                        default=int(env_default("DELTAZIP_TLS_REQUIRE_CLIENT_CERT", "0")),
                        help="1 = mutual TLS: refuse clients without a certificate signed by --tls-ca "
                             "(DELTAZIP_TLS_REQUIRE_CLIENT_CERT)")


def add_auth_flag(parser: argparse.ArgumentParser) -> None:
    """--auth-tokens: the tokens file; '' = auth off (loopback dev only)."""
    parser.add_argument("--auth-tokens", default=env_default("DELTAZIP_AUTH_TOKENS", ""),
                        help="tokens file (token sha256 → tenant, scopes); '' = no auth, for loopback dev only "
                             "(DELTAZIP_AUTH_TOKENS)")


def tls_settings(config) -> TlsSettings:
    """The TlsSettings of a service config with tls_* fields (validates the files)."""
    require = getattr(config, "tls_require_client_cert", 0)
    if require not in (0, 1):
        raise ValueError(f"--tls-require-client-cert must be 0 or 1, got {require}")
    return TlsSettings(config.tls_ca, config.tls_cert, config.tls_key, config.tls_server_name, bool(require))


def tls_kwargs(args: argparse.Namespace) -> dict:
    """The tls_* and auth_tokens config fields from parsed flags (those the parser has)."""
    names = ("tls_cert", "tls_key", "tls_ca", "tls_server_name", "tls_require_client_cert", "auth_tokens")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
