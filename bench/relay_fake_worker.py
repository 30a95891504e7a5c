"""A worker without an engine, for bench/relay.py: Worker.Generate streams max_tokens tokens as fast as gRPC takes
them, the first alone, then `--chunk-tokens` per chunk (what the real worker's chunking sends when it has tokens
ready). What the scheduler + client relay sustains behind it is the relay's own ceiling.

`--step-ms S` paces it like a real engine whose decode step takes S ms: a chunk leaves each S ms x its size, its
size being what the worker's chunking sends at that pace (up to --chunk-tokens, flushed after --flush-ms).
`--num-models M` publishes fine-tunes ft-000 ... on its device tier, so schedulers route them as resident deltas
(bench/sched_cost.py).

    python -m bench.relay_fake_worker --redis-url redis://127.0.0.1:6379/0 --port 50070 --chunk-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import math

import grpc

from deltazip.cluster.connection import connect
from deltazip.cluster.workers import Tier, WorkerRecord, WorkerRegistry
from deltazip.rpc.options import server_options
from deltazip.v1 import common_pb2, worker_pb2_grpc

BASE = "tiny-base"


def model_names(num_models: int) -> list[str]:
    """The fine-tunes a paced fake worker publishes as resident (bench/sched_cost.py registers the same names)."""
    return [f"ft-{i:03d}" for i in range(num_models)]


class EchoWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, chunk_tokens: int, step_ms: float = 0.0, flush_ms: float = 50.0):
        self.worker_id, self.step_s = worker_id, step_ms / 1e3
        # the real worker's chunks at this pace: as many tokens as fit in the flush interval, at most chunk_tokens
        self.chunk_tokens = chunk_tokens if not step_ms else max(1, min(chunk_tokens, math.ceil(flush_ms / step_ms)))

    async def Generate(self, request, context):
        num_tokens = request.sampling.max_tokens or 16
        sent = 0
        while sent < num_tokens:
            n = 1 if sent == 0 else min(self.chunk_tokens, num_tokens - sent)
            if self.step_s:
                await asyncio.sleep(self.step_s * n)
            ids = [97 + (sent + i) % 26 for i in range(n)]
            chunk = common_pb2.GenerateChunk(request_id=request.request_id, token_ids=ids, text=bytes(ids).decode(),
                                             worker_id=self.worker_id, model=request.model)
            sent += n
            if sent == num_tokens:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=1, completion_tokens=num_tokens, ttft_ms=0.1))
            yield chunk


async def serve(redis_url: str, port: int, chunk_tokens: int, step_ms: float = 0.0, num_models: int = 0,
                flush_ms: float = 50.0) -> None:
    worker_id = f"echo-{port}"
    server = grpc.aio.server(options=server_options())  # the real services' options (pending-call limits)
    worker_pb2_grpc.add_WorkerServicer_to_server(EchoWorker(worker_id, chunk_tokens, step_ms, flush_ms), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    redis = connect(redis_url)
    registry = WorkerRegistry(redis, ttl_s=5.0)
    record = WorkerRecord(worker_id, f"127.0.0.1:{port}", base=BASE)
    try:
        while True:  # heartbeat until killed
            await registry.heartbeat(record, {Tier.DEVICE: model_names(num_models)})
            await asyncio.sleep(1.0)
    finally:
        await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.relay_fake_worker", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunk-tokens", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=0.0, help="decode step time paced (0 = as fast as gRPC takes them)")
    p.add_argument("--num-models", type=int, default=0, help="fine-tunes ft-000... published on the device tier")
    p.add_argument("--flush-ms", type=float, default=50.0, help="the worker's --stream-interval-ms being mimicked")
    args = p.parse_args()
    asyncio.run(serve(args.redis_url, args.port, args.chunk_tokens, args.step_ms, args.num_models, args.flush_ms))


if __name__ == "__main__":
    main()
