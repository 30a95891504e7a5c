"""Gateway configuration: flags and DELTAZIP_* env vars, validated once in main()."""

import argparse
from pathlib import Path
from dataclasses import dataclass

from deltazip.metrics import add_metrics_flag, validate_metrics_port
from deltazip.rpc.flags import add_tls_flags, env_default, tls_kwargs, tls_settings, validate_port_and_log_level


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    scheduler: str = "127.0.0.1:50051"  # any scheduler replica (or a load balancer in front of them)
    log_level: str = "info"
    request_timeout_s: float = 600.0  # deadline passed to the scheduler per request
    default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    metrics_port: int = 0  # /metrics is always on the HTTP port too; this adds a separate one
    tls_cert: str = ""  # client certificate for mutual TLS to the scheduler
    tls_key: str = ""
    tls_ca: str = ""  # CA of the scheduler's certificate; set = dial it over TLS
    tls_server_name: str = ""  # name checked in the scheduler's certificate
    https_cert: str = ""  # PEM certificate for HTTPS on --port; '' = plain HTTP (bearer tokens then travel in clear)
    https_key: str = ""

    def __post_init__(self) -> None:
        validate_port_and_log_level(self.port, self.log_level)
        if ":" not in self.scheduler:
            raise ValueError(f"--scheduler {self.scheduler!r} must be host:port")
        if self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout-s {self.request_timeout_s} must be > 0")
        if self.default_max_tokens < 1:
            raise ValueError(f"--default-max-tokens {self.default_max_tokens} must be >= 1")
        validate_metrics_port(self.metrics_port)
        tls_settings(self)
        if bool(self.https_cert) != bool(self.https_key):
            raise ValueError("--https-cert and --https-key go together (DELTAZIP_HTTPS_CERT, DELTAZIP_HTTPS_KEY)")
        for flag, path in (("--https-cert", self.https_cert), ("--https-key", self.https_key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path!r} is not a readable file")


def parse_config(argv: list[str] | None = None) -> GatewayConfig:
    """Build the config from flags, whose defaults come from env vars."""
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description="DeltaZip OpenAI-compatible HTTP gateway")
    parser.add_argument("--host", default=env_default("DELTAZIP_HOST", "0.0.0.0"), help="bind address (DELTAZIP_HOST)")
    parser.add_argument("--port", type=int, default=int(env_default("DELTAZIP_PORT", "8000")),
                        help="HTTP port, 0 = any free port (DELTAZIP_PORT)")
    parser.add_argument("--scheduler", default=env_default("DELTAZIP_SCHEDULER", "127.0.0.1:50051"),
                        help="scheduler host:port (DELTAZIP_SCHEDULER)")
    parser.add_argument("--log-level", default=env_default("DELTAZIP_LOG_LEVEL", "info"), help="(DELTAZIP_LOG_LEVEL)")
    parser.add_argument("--request-timeout-s", type=float, default=float(env_default("DELTAZIP_REQUEST_TIMEOUT_S", "600")),
                        help="deadline of one generation (DELTAZIP_REQUEST_TIMEOUT_S)")
    parser.add_argument("--default-max-tokens", type=int, default=int(env_default("DELTAZIP_DEFAULT_MAX_TOKENS", "16")),
                        help="max_tokens of /v1/completions when the request has none (DELTAZIP_DEFAULT_MAX_TOKENS)")
    add_metrics_flag(parser)
    add_tls_flags(parser, server=False)
    parser.add_argument("--https-cert", default=env_default("DELTAZIP_HTTPS_CERT", ""),
                        help="PEM certificate: serve HTTPS; '' = plain HTTP (DELTAZIP_HTTPS_CERT)")
    parser.add_argument("--https-key", default=env_default("DELTAZIP_HTTPS_KEY", ""),
                        help="PEM private key of --https-cert (DELTAZIP_HTTPS_KEY)")
    args = parser.parse_args(argv)
    return GatewayConfig(
        host=args.host, port=args.port, scheduler=args.scheduler, log_level=args.log_level,
        request_timeout_s=args.request_timeout_s, default_max_tokens=args.default_max_tokens,
        metrics_port=args.metrics_port, https_cert=args.https_cert, https_key=args.https_key, **tls_kwargs(args),
    )
