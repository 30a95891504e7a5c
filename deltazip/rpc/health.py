"""Waiting for a server's grpc.health.v1 status to become SERVING."""

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deltazip.rpc.channels import aio_channel, sync_channel
from deltazip.security.tls import PLAINTEXT, TlsSettings

SERVING = health_pb2.HealthCheckResponse.SERVING


def wait_for_serving(address: str, timeout_s: float = 10.0, service: str = "", tls: TlsSettings = PLAINTEXT) -> None:
    """Block until `address` reports SERVING (over TLS when `tls` has a CA); TimeoutError says which address never came up."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == SERVING:
                    return
                last_error = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.05)
    raise TimeoutError(f"{address} was not SERVING after {timeout_s:.1f}s ({last_error})")


async def async_wait_for_serving(address: str, timeout_s: float = 10.0, service: str = "",
                                 tls: TlsSettings = PLAINTEXT) -> None:
    """Async twin of `wait_for_serving`."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    async with aio_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == SERVING:
                    return
                last_error = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{address} was not SERVING after {timeout_s:.1f}s ({last_error})")
