"""`python -m services.delta_store`: serve artifacts from a directory, registered in Redis."""

import asyncio
import sys
import time
from pathlib import Path

from redis.exceptions import RedisError

from deltazip.cluster.connection import connect
from deltazip.cluster.heartbeat import heartbeat_loop
from deltazip.cluster.models import ModelRegistry
from deltazip.cluster.stores import StoreRecord, StoreRegistry
from deltazip.logs import get_logger
from deltazip.rpc.auth import Authenticator
from deltazip.rpc.flags import advertise_address, tls_settings
from deltazip.metrics import start_metrics_server
from deltazip.rpc.server import Registration, RpcServer, service_name
from deltazip.security.tls import is_loopback
from deltazip.security.tokens import TokenTable
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc
from deltazip.rpc.service_main import run_service
from services.delta_store.config import StoreConfig, parse_config
from services.delta_store.server import DeltaStoreServicer, sync_registry
from services.delta_store.storage import DeltaStorage

log = get_logger("delta_store")


async def serve(config: StoreConfig) -> None:
    """Run the store until SIGTERM/SIGINT."""
    redis = connect(config.redis_url)
    storage = DeltaStorage(Path(config.root))
    num_stale = storage.remove_stale(config.stale_staging_s)
    registry = ModelRegistry(redis)
    auth = Authenticator(TokenTable(config.auth_tokens) if config.auth_tokens else None)
    servicer = DeltaStoreServicer(storage, registry, config.store_id, config.max_artifact_bytes, auth)
    server = RpcServer(
        f"{config.host}:{config.port}",
        [Registration(service_name(delta_store_pb2, "DeltaStore"), delta_store_pb2_grpc.add_DeltaStoreServicer_to_server, servicer)],
        tls=tls_settings(config),
    )
    port = await server.start()
    if not auth.enabled and not is_loopback(config.host):
        log.warning("auth_disabled", hint="any caller may read and change every model; pass --auth-tokens, "
                                          "see docs/operations.md#security")
    start_metrics_server(config.metrics_port, config.host)
    address = advertise_address(config.host, port, config.advertise)
    try:
        num_synced = await sync_registry(storage, registry, config.store_id)
    except RedisError as exc:
        num_synced = 0
        log.warning("registry_sync_failed", error=str(exc))
    log.info("store_ready", address=address, root=str(storage.root), store_id=config.store_id,
             num_models=len(storage.names()), num_synced=num_synced, num_stale_removed=num_stale,
             auth=auth.enabled)

    stores = StoreRegistry(redis, ttl_s=config.heartbeat_ttl_s)
    record = StoreRecord(config.store_id, address, root=str(storage.root), started_ms=int(time.time() * 1000))
    stop = asyncio.Event()
    needs_sync = num_synced == 0 and bool(storage.names())  # the start-up sync may have failed

    async def beat() -> None:
        nonlocal needs_sync
        try:
            await stores.heartbeat(record)
        except (RedisError, OSError):
            needs_sync = True  # Redis may come back without its data: re-register what is on disk then
            raise
        if needs_sync:
            log.info("registry_synced", num_synced=await sync_registry(storage, registry, config.store_id))
            needs_sync = False

    beat_task = asyncio.create_task(heartbeat_loop(beat, config.heartbeat_s, stop))

    async def on_shutdown() -> None:
        stop.set()
        await beat_task
        try:
            await stores.unregister(config.store_id)
        except RedisError as exc:
            log.warning("unregister_failed", error=str(exc))

    await server.serve_until_signal(config.grace_s, on_shutdown)
    await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    """Parse flags/env, configure logs, serve."""
    return run_service("delta_store", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
