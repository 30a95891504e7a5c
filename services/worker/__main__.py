"""`python -m services.worker`: serve one base model plus many deltas over gRPC, registered in Redis."""

from __future__ import annotations

import asyncio
import sys
import time

from redis.exceptions import RedisError

from deltazip.cluster.connection import connect
from deltazip.cluster.workers import WorkerRecord
from deltazip.logs import configure_logging, get_logger
from deltazip.metrics import start_metrics_server
from deltazip.rpc.flags import tls_settings
from deltazip.rpc.server import Registration, RpcServer, service_name
from deltazip.v1 import worker_pb2, worker_pb2_grpc
from services.worker.bootstrap import WorkerParts, build_worker
from services.worker.config import WorkerConfig, config_from_args
from services.worker.publisher import Publisher, WorkerLoad, cluster_residency
from deltazip.cluster.models import ModelRegistry
from services.worker.model_sync import ModelSync
from services.worker.server import WorkerServicer

log = get_logger("services.worker")


async def serve(config: WorkerConfig, parts: WorkerParts) -> None:
    """Start the engine loop, the gRPC server and the Redis publisher; run until SIGTERM/SIGINT."""
    app = parts.app
    servicer = WorkerServicer(app, "", config.default_max_tokens)
    server = RpcServer(f"{config.host}:{config.port}",
                       [Registration(service_name(worker_pb2, "Worker"), worker_pb2_grpc.add_WorkerServicer_to_server,
                                     servicer)], tls=tls_settings(config))
    parts.loop.start()
    port = await server.start()
    start_metrics_server(config.metrics_port, config.host)
    servicer.address = address = config.address(port)

    redis = connect(config.redis_url)
    record = WorkerRecord(worker_id=config.worker_id, address=address, base=app.info.base_name,
                          base_identity=app.info.base_identity, device=app.info.device, mode=config.mode,
                          num_device_slots=config.num_device_slots,
                          started_ms=int(time.time() * 1000))

    def load() -> WorkerLoad:
        s = parts.loop.stats
        return WorkerLoad(s.num_running, s.num_waiting, s.queued_tokens, s.free_kv_blocks, s.total_kv_blocks)

    publisher = Publisher(redis, record, load, lambda: cluster_residency(parts.residency.lru_names),
                          ttl_s=config.heartbeat_ttl_s, interval_s=config.heartbeat_s)
    parts.listeners.callbacks.append(publisher.on_residency_change)
    publisher.on_stores = lambda addresses: parts.live_store_addresses.__setitem__(slice(None), addresses)
    try:
        await publisher.start()
    except (RedisError, OSError) as exc:
        log.warning("redis_unavailable_at_start", error=str(exc), redis_url=config.redis_url)
    stop = asyncio.Event()
    beats = asyncio.create_task(publisher.run(stop))
    model_sync = asyncio.create_task(ModelSync(ModelRegistry(redis), parts.residency, config.model_sync_s).run(stop))
    log.info("worker_ready", worker=config.worker_id, address=address, base=app.info.base_name)

    async def on_shutdown() -> None:
        stop.set()
        await beats
        await model_sync
        await publisher.close()

    await server.serve_until_signal(config.grace_s, on_shutdown)
    parts.close()
    await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    """Parse flags/env, configure logs, load the model, serve."""
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, service="worker")
    try:
        parts = build_worker(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("worker_start_failed", error=str(exc))
        return 2
    asyncio.run(serve(config, parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
