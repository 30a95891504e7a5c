"""`python -m services.gateway`: OpenAI-compatible HTTP in front of the schedulers."""

import asyncio
import signal
import ssl
import sys

from aiohttp import web

from deltazip.logs import get_logger
from deltazip.metrics import start_metrics_server
from deltazip.security.tls import is_loopback
from deltazip.rpc.service_main import run_service
from services.gateway.config import GatewayConfig, parse_config
from services.gateway.server import build_app

log = get_logger("gateway")


def https_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP port when a certificate is configured."""
    if not config.https_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.https_cert, config.https_key)
    return context


async def serve(config: GatewayConfig) -> None:
    """Serve HTTP until SIGTERM/SIGINT; prints the bound port in the `gateway_ready` log line."""
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=https_context(config))
    await site.start()
    port = runner.addresses[0][1]
    start_metrics_server(config.metrics_port, config.host)
    log.info("gateway_ready", address=f"{config.host}:{port}", scheduler=config.scheduler, https=bool(config.https_cert))
    if not config.https_cert and not is_loopback(config.host):
        log.warning("plaintext_http", hint="bearer tokens in Authorization headers can be read on the network; "
                                           "pass --https-cert/--https-key or put an HTTPS proxy in front")
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    log.info("gateway_stopping")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse flags/env, configure logs, serve."""
    return run_service("gateway", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
