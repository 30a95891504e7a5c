"""`python -m services.scheduler`: the public Generate API, any number of replicas."""

import asyncio
import sys

from deltazip.cluster.connection import connect
from deltazip.cluster.workers import Tier
from deltazip.metrics import start_metrics_server
from deltazip.logs import get_logger
from deltazip.rpc.channels import ChannelPool
from deltazip.rpc.auth import Authenticator
from deltazip.rpc.flags import advertise_address, tls_settings
from deltazip.rpc.server import Registration, RpcServer, service_name
from deltazip.security.tls import is_loopback
from deltazip.security.tokens import TokenTable
from deltazip.v1 import scheduler_pb2, scheduler_pb2_grpc
from deltazip.rpc.service_main import run_service
from services.scheduler.burst import BurstPolicy, BurstPrefetcher
from services.scheduler.cluster_view import ClusterView
from services.scheduler.config import SchedulerConfig, parse_config
from services.scheduler.server import SchedulerServicer

log = get_logger("scheduler")


async def serve(config: SchedulerConfig) -> None:
    """Run the scheduler until SIGTERM/SIGINT."""
    redis = connect(config.redis_url)
    tls = tls_settings(config)
    channels = ChannelPool(tls)
    auth = Authenticator(TokenTable(config.auth_tokens) if config.auth_tokens else None)
    view = ClusterView(redis, config.base_name, config.rate_tau_s, config.lease_s)
    servicer = SchedulerServicer(view, channels, config, auth)
    server = RpcServer(
        f"{config.host}:{config.port}",
        [Registration(service_name(scheduler_pb2, "Scheduler"), scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer)],
        tls=tls, reuse_port=config.processes > 1,
    )
    port = await server.start()
    if not auth.enabled and not is_loopback(config.host):
        log.warning("auth_disabled", hint="any caller may read and change every model; pass --auth-tokens, "
                                          "see docs/operations.md#security")
    start_metrics_server(config.metrics_port, config.host)
    log.info("scheduler_ready", address=advertise_address(config.host, port, config.advertise),
             scheduler_id=config.scheduler_id, auth=auth.enabled, tls=tls.serves_tls)
    stop = asyncio.Event()
    detector = None
    if config.prefetch_interval_s > 0:
        policy = BurstPolicy(config.prefetch_interval_s, config.burst_rate_per_s, config.burst_pending,
                             config.prefetch_rate_per_worker, config.prefetch_window_s, Tier(config.prefetch_tier),
                             config.prefetch_timeout_s)
        prefetcher = BurstPrefetcher(servicer.view, channels, policy, config.scheduler_id, config.affinity_slack)
        detector = asyncio.create_task(prefetcher.run(stop))
    await server.serve_until_signal(config.grace_s)
    stop.set()
    if detector is not None:
        await detector
    await channels.close()
    await redis.aclose()


async def serve_all(config: SchedulerConfig) -> None:
    """`serve`, in --processes processes: this one and children it starts, watches and stops."""
    if config.processes == 1:
        await serve(config)
        return
    from services.scheduler.processes import ProcessGroup

    group = ProcessGroup(config, "services.scheduler.__main__:serve")
    watcher = asyncio.create_task(group.watch())
    try:
        await serve(group.config_of(0))
    finally:
        watcher.cancel()
        await asyncio.to_thread(group.stop)


def main(argv: list[str] | None = None) -> int:
    """Parse flags/env, configure logs, serve."""
    return run_service("scheduler", parse_config, serve_all, argv)


if __name__ == "__main__":
    sys.exit(main())
