"""Running one Generate: route to a worker, relay its stream, retry elsewhere if it fails before any token."""

from collections.abc import AsyncIterator

import grpc

from deltazip.cluster.requests import RequestState
from deltazip.logs import bind_fields, get_logger
from deltazip.rpc.channels import ChannelPool
from deltazip.rpc.errors import ServiceError, Unavailable
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.scheduler.cluster_view import ClusterView
from services.scheduler.routing import Candidate, rank
from services.scheduler.validation import GenerateJob

log = get_logger("scheduler")

# A worker answering with these failed for reasons another worker may not share.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
})


class WorkerFailed(Exception):
    """The chosen worker's stream broke; `num_tokens` were already relayed."""

    def __init__(self, worker_id: str, error: grpc.aio.AioRpcError, num_tokens: int):
        super().__init__(f"{worker_id}: {error.code().name}: {error.details()}")
        self.worker_id = worker_id
        self.error = error
        self.num_tokens = num_tokens


class Relay:
    """Generate's unit of work, shared by all requests of this scheduler (holds no request state)."""

    def __init__(self, view: ClusterView, channels: ChannelPool, max_attempts: int, affinity_slack: int):
        self.view = view
        self.channels = channels
        self.max_attempts = max_attempts
        self.affinity_slack = affinity_slack

    async def generate(self, job: GenerateJob, is_base: bool, time_remaining) -> AsyncIterator[common_pb2.GenerateChunk]:
        """Chunks for `job`; `time_remaining()` is the client's deadline (None = none)."""
        tried: list[str] = []
        last_error: WorkerFailed | None = None
        while len(tried) < self.max_attempts:
            worker = await self._choose(job, is_base, exclude=set(tried))
            if worker is None:
                break
            tried.append(worker.worker.worker_id)
            try:
                async for chunk in self._attempt(job, worker, len(tried), time_remaining):
                    yield chunk
                return
            except WorkerFailed as failed:
                last_error = failed
                code = failed.error.code()
                if failed.num_tokens:
                    raise Unavailable(
                        f"worker {failed.worker_id} failed after streaming {failed.num_tokens} tokens "
                        f"({code.name}: {failed.error.details()}); the request can be retried"
                    ) from None
                if code not in RETRYABLE:  # the worker's verdict on the request itself, e.g. prompt too long
                    raise ServiceError(failed.error.details() or code.name, code) from None
                log.warning("worker_attempt_failed", worker=failed.worker_id, attempt=len(tried), code=code.name,
                            message=failed.error.details())
        if last_error is None:
            raise Unavailable(
                "no live worker to run this request; start one with `python -m services.worker` and check that it "
                "reaches the same Redis as this scheduler (its heartbeat keys dz:worker:*)"
            )
        raise Unavailable(
            f"{len(tried)} worker(s) failed before producing a token (last: {last_error}); retry the request"
        )

    async def _choose(self, job: GenerateJob, is_base: bool, exclude: set[str]) -> Candidate | None:
        candidates = [c for c in await self.view.candidates(job.model, is_base) if c.worker.worker_id not in exclude]
        ranked = rank(candidates, self.affinity_slack, salt=job.request_id)
        return ranked[0] if ranked else None

    async def _attempt(self, job: GenerateJob, chosen: Candidate, attempt: int, time_remaining):
        worker = chosen.worker
        bind_fields(worker=worker.worker_id)
        log.info("request_routed", attempt=attempt, tier=chosen.tier.value if chosen.tier else "remote", load=chosen.load)
        await self.view.requests.routed(job.request_id, worker.worker_id)
        await self.view.workers.add_inflight(worker.worker_id, 1)
        stub = worker_pb2_grpc.WorkerStub(self.channels.get(worker.address))
        call = stub.Generate(worker_request(job, attempt), timeout=time_remaining())
        num_tokens = 0
        try:
            async for chunk in call:
                if not num_tokens and chunk.token_ids:
                    await self.view.requests.set_state(job.request_id, RequestState.RUNNING)
                    await self.view.queues.started(job.model)
                num_tokens += len(chunk.token_ids)
                chunk.request_id = job.request_id
                chunk.worker_id = chunk.worker_id or worker.worker_id
                chunk.model = chunk.model or job.model
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise WorkerFailed(worker.worker_id, exc, num_tokens) from None
        finally:
            call.cancel()  # no-op when finished; stops the worker's GPU work when the client went away
            await self.view.workers.add_inflight(worker.worker_id, -1)


def worker_request(job: GenerateJob, attempt: int) -> worker_pb2.WorkerGenerateRequest:
    """The worker's request for `job`."""
    request = worker_pb2.WorkerGenerateRequest(request_id=job.request_id, model=job.model, attempt=attempt)
    request.sampling.CopyFrom(job.request.sampling)
    if job.request.WhichOneof("input") == "messages":
        request.messages.CopyFrom(job.request.messages)
    else:
        request.prompt = job.request.prompt
    return request
