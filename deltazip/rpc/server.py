"""grpc.aio server bootstrap: health + reflection on every server, graceful stop on SIGTERM/SIGINT."""

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltazip.logs import get_logger
from deltazip.rpc.malformed import MalformedRequestInterceptor
from deltazip.rpc.options import MAX_MESSAGE_BYTES, server_options
from deltazip.security.tls import PLAINTEXT, TlsSettings, is_loopback, server_credentials

log = get_logger("deltazip.rpc")


@dataclass(frozen=True, slots=True)
class Registration:
    """One servicer to host: `add(servicer, server)` is the generated `add_XServicer_to_server`."""

    service_name: str  # full proto name, e.g. "deltazip.v1.Scheduler"
    add: Callable[[object, grpc.aio.Server], None]
    servicer: object


def service_name(grpc_module, service: str) -> str:
    """Full name of `service` from a generated *_pb2 module, e.g. ("deltazip.v1.Worker")."""
    return grpc_module.DESCRIPTOR.services_by_name[service].full_name


class RpcServer:
    """A started grpc.aio server with its health servicer; stop it with `stop` or a signal."""

    def __init__(self, bind: str, registrations: list[Registration], max_message_bytes: int = MAX_MESSAGE_BYTES,
                 tls: TlsSettings = PLAINTEXT, reuse_port: bool = False):
        """`reuse_port`: see `server_options`."""
        self.bind = bind
        self.tls = tls
        self.registrations = registrations
        self.server = grpc.aio.server(options=server_options(max_message_bytes, reuse_port),
                                      interceptors=[MalformedRequestInterceptor()])
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Register servicers, bind, start and report SERVING; returns the bound port."""
        names = [r.service_name for r in self.registrations]
        for reg in self.registrations:
            reg.add(reg.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], self.server
        )
        try:
            if self.tls.serves_tls:
                self.port = self.server.add_secure_port(self.bind, server_credentials(self.tls))
            else:
                self.port = self.server.add_insecure_port(self.bind)
        except RuntimeError as exc:
            raise OSError(f"cannot bind {self.bind}: {exc}; pick a free port with --port") from exc
        if self.port == 0:
            raise OSError(f"cannot bind {self.bind}; pick a free port with --port")
        await self.server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server_started", bind=self.bind, port=self.port, services=names, tls=self.tls.serves_tls,
                 mtls=self.tls.require_client_cert)
        if not self.tls.serves_tls and not is_loopback(self.bind):
            log.warning("plaintext_listener", bind=self.bind,
                        hint="traffic (tokens, weights) can be read on the network; pass --tls-cert/--tls-key, "
                             "see docs/operations.md#security")
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for up to `grace_s`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        log.info("server_stopped", port=self.port)

    async def serve_until_signal(
        self, grace_s: float, on_shutdown: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), then run `on_shutdown` and stop gracefully."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        waiters = [asyncio.ensure_future(signalled.wait()), asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("shutdown_requested", signal=signalled.is_set())
        await self.health.enter_graceful_shutdown()
        if on_shutdown is not None:
            await on_shutdown()
        await self.stop(grace_s)
