"""A test double for the worker's unit of work: Worker.Generate echoes the prompt's words as tokens.

It lets the scheduler's routing, relay, retries and cancellation be tested without a model. Behaviour per
instance: "echo", "fail_before" (UNAVAILABLE before any token), "fail_after" (2 tokens then UNAVAILABLE),
"too_long" (INVALID_ARGUMENT like the real worker's prompt check), "slow" (one token per 50 ms, 200 tokens),
"hang" (accepts the request and never answers, like a worker whose process is stopped).
"""

import asyncio
import threading
import time
from concurrent import futures

import grpc

from deltazip.cluster.connection import connect
from deltazip.cluster.workers import Tier, WorkerRecord, WorkerRegistry
from deltazip.rpc.ports import free_port
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc

TOO_LONG_MESSAGE = "prompt has 9000 tokens; this worker's context is 2048 tokens: shorten the prompt"


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, mode: str = "echo"):
        self.worker_id = worker_id
        self.mode = mode
        self.requests: list[worker_pb2.WorkerGenerateRequest] = []
        self.loads: list[worker_pb2.LoadDeltaRequest] = []
        self.cancelled = threading.Event()
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self.server)
        self.server.add_insecure_port(self.address)
        self.server.start()

    def Generate(self, request, context):
        self.requests.append(request)
        done = threading.Event()
        context.add_callback(lambda: None if done.is_set() else self.cancelled.set())
        if self.mode == "fail_before":
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker is draining")
        if self.mode == "too_long":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, TOO_LONG_MESSAGE)
        if self.mode == "hang":
            while context.is_active():
                time.sleep(0.02)
            return
        words = request.prompt.split() if request.prompt else [m.content for m in request.messages.messages]
        if self.mode == "slow":
            words = [f"w{i}" for i in range(200)]
        for i, word in enumerate(words):
            if self.mode == "fail_after" and i == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker lost its GPU")
            if self.mode == "slow":
                time.sleep(0.05)
            yield common_pb2.GenerateChunk(token_ids=[i], text=word + " ", worker_id=self.worker_id, model=request.model)
        done.set()
        yield common_pb2.GenerateChunk(
            finish_reason=common_pb2.FINISH_REASON_STOP, worker_id=self.worker_id, model=request.model,
            usage=common_pb2.Usage(prompt_tokens=len(words), completion_tokens=len(words), ttft_ms=1.0),
        )

    def LoadDelta(self, request, context):
        self.loads.append(request)
        return worker_pb2.LoadDeltaResponse(tier=request.tier or common_pb2.RESIDENCY_TIER_DEVICE, load_ms=1.0)

    def stop(self) -> None:
        self.server.stop(grace=None)


def publish(redis_url: str, worker_id: str, address: str, residency: dict[Tier, list[str]] | None = None,
            num_running: int = 0, ttl_s: float = 60.0) -> None:
    """Register a worker in Redis the way the worker service does (one heartbeat)."""

    async def body():
        redis = connect(redis_url)
        await WorkerRegistry(redis, ttl_s=ttl_s).heartbeat(
            WorkerRecord(worker_id, address, base="tiny-base", num_running=num_running), residency or {}
        )
        await redis.aclose()

    asyncio.run(body())
