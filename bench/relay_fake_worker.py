"""A worker without an engine, for bench/relay.py: Worker.Generate streams max_tokens tokens as fast as gRPC takes
them, the first alone, then `--chunk-tokens` per chunk (what the real worker's chunking sends when it has tokens
ready). What the scheduler + client relay sustains behind it is the relay's own ceiling.

    python -m bench.relay_fake_worker --redis-url redis://127.0.0.1:6379/0 --port 50070 --chunk-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from deltazip.cluster.connection import connect
from deltazip.cluster.workers import WorkerRecord, WorkerRegistry
from deltazip.v1 import common_pb2, worker_pb2_grpc

BASE = "tiny-base"


class EchoWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, chunk_tokens: int):
        self.worker_id, self.chunk_tokens = worker_id, chunk_tokens

    async def Generate(self, request, context):
        num_tokens = request.sampling.max_tokens or 16
        sent = 0
        while sent < num_tokens:
            n = 1 if sent == 0 else min(self.chunk_tokens, num_tokens - sent)
            ids = [97 + (sent + i) % 26 for i in range(n)]
            chunk = common_pb2.GenerateChunk(request_id=request.request_id, token_ids=ids, text=bytes(ids).decode(),
                                             worker_id=self.worker_id, model=request.model)
            sent += n
            if sent == num_tokens:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=1, completion_tokens=num_tokens, ttft_ms=0.1))
            yield chunk


async def serve(redis_url: str, port: int, chunk_tokens: int) -> None:
    worker_id = f"echo-{port}"
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(EchoWorker(worker_id, chunk_tokens), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    redis = connect(redis_url)
    registry = WorkerRegistry(redis, ttl_s=5.0)
    record = WorkerRecord(worker_id, f"127.0.0.1:{port}", base=BASE)
    try:
        while True:  # heartbeat until killed
            await registry.heartbeat(record, {})
            await asyncio.sleep(1.0)
    finally:
        await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.relay_fake_worker", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunk-tokens", type=int, default=1)
    args = p.parse_args()
    asyncio.run(serve(args.redis_url, args.port, args.chunk_tokens))


if __name__ == "__main__":
    main()
