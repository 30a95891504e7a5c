"""WorkerServicer: Worker gRPC methods, translating protos to WorkerApp calls and back."""

from __future__ import annotations

import contextlib

import grpc

from deltazip.cluster.models import MODEL_NAME, MODEL_NAME_RULE
from deltazip.logs import bind_request, get_logger, new_request_id
from deltazip.rpc.errors import InvalidArgument, rpc_method
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker.app import GenerateEvent, GenerateInput, WorkerApp, sampling_from_fields
from services.worker.residency import Tier

log = get_logger("services.worker.server")

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Thin: validate, call WorkerApp, stream GenerateChunks."""

    def __init__(self, app: WorkerApp, address: str, default_max_tokens: int) -> None:
        self.app = app
        self.address = address
        self._default_max_tokens = default_max_tokens

    @rpc_method
    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext):
        inp = self._generate_input(request)
        wid = self.app.info.worker_id
        with bind_request(inp.request_id, model=inp.model, worker=wid):
            log.info("request_received", attempt=request.attempt)
            # closed with this stream (the caller went away), so the engine drops the sequence at once
            async with contextlib.aclosing(self.app.generate(inp)) as events:
                async for event in events:
                    yield _chunk(inp, event, wid)

    @rpc_method
    async def LoadDelta(self, request: worker_pb2.LoadDeltaRequest, context) -> worker_pb2.LoadDeltaResponse:
        self._check_model(request.model)
        tier = _tier(request.tier, default=Tier.DEVICE)
        if tier not in (Tier.DEVICE, Tier.HOST):
            raise InvalidArgument("LoadDelta tier must be DEVICE or HOST")
        snap = await self.app.load_delta(request.model, tier)
        return worker_pb2.LoadDeltaResponse(tier=int(snap.tier), load_ms=self.app.load_ms(request.model),
                                            bytes=snap.bytes)

    @rpc_method
    async def EvictDelta(self, request: worker_pb2.EvictDeltaRequest, context) -> worker_pb2.EvictDeltaResponse:
        self._check_model(request.model)
        tier = _tier(request.tier, default=Tier.DEVICE)
        if tier is Tier.REMOTE:
            raise InvalidArgument("EvictDelta tier must be DEVICE, HOST or DISK")
        return worker_pb2.EvictDeltaResponse(evicted=self.app.evict_delta(request.model, tier))

    @rpc_method
    async def Status(self, request: worker_pb2.StatusRequest, context) -> worker_pb2.StatusResponse:
        status = self.app.status()
        info, stats = status.info, status.stats
        deltas = [worker_pb2.ResidentDelta(model=d.name, tier=int(d.tier), bytes=d.bytes) for d in status.deltas]
        return worker_pb2.StatusResponse(
            worker_id=info.worker_id, address=self.address, base=info.base_name, device=info.device,
            num_running=stats.num_running, num_waiting=stats.num_waiting, free_kv_blocks=stats.free_kv_blocks,
            total_kv_blocks=stats.total_kv_blocks, deltas=deltas, mode=info.mode,
            step_phases=[worker_pb2.StepPhase(name=name, count=count, seconds=seconds)
                         for name, (count, seconds) in status.step_phases.items()],
            kernels_warming=status.kernels_warming,
            delta_segments=[worker_pb2.SegmentBin(step=step, min_rows=low, segments=num, rows=rows)
                            for (step, low), (num, rows) in sorted(status.delta_segments.items())],
            merged_cache=worker_pb2.MergedCacheStats(**status.merged_cache) if status.merged_cache else None)

    def _check_model(self, model: str) -> None:
        """A delta name must be one the store accepts: it becomes a directory of the disk cache."""
        if self.app.delta_of(model) is not None and not MODEL_NAME.fullmatch(model):
            raise InvalidArgument(f"{model!r} is not a valid model name: use {MODEL_NAME_RULE}")

    def _generate_input(self, request: worker_pb2.WorkerGenerateRequest) -> GenerateInput:
        self._check_model(request.model)
        s = request.sampling
        sampling = sampling_from_fields(
            max_tokens=s.max_tokens, temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None, top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None, stop=list(s.stop), ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens, default_max_tokens=self._default_max_tokens)
        which = request.WhichOneof("input")
        messages = None
        if which == "messages":
            messages = tuple((m.role, m.content) for m in request.messages.messages)
            if not messages:
                raise InvalidArgument("messages is empty; send at least one chat message")
        elif which is None:
            raise InvalidArgument("send a prompt or chat messages")
        return GenerateInput(request_id=request.request_id or new_request_id(), model=request.model,
                             prompt=request.prompt if which == "prompt" else None, messages=messages,
                             sampling=sampling, attempt=request.attempt)


def _chunk(inp: GenerateInput, event: GenerateEvent, worker_id: str) -> common_pb2.GenerateChunk:
    chunk = common_pb2.GenerateChunk(request_id=inp.request_id, token_ids=event.token_ids, text=event.text,
                                     worker_id=worker_id, model=inp.model)
    if event.finish_reason is not None:
        chunk.finish_reason = _FINISH[event.finish_reason]
        u = event.usage
        chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                              ttft_ms=u.ttft_ms, total_ms=u.total_ms, queue_ms=u.queue_ms))
    return chunk


def _tier(value: int, default: Tier) -> Tier:
    if value == common_pb2.RESIDENCY_TIER_UNSPECIFIED:
        return default
    if value not in {t.value for t in Tier}:
        raise InvalidArgument(f"tier {value} is not a ResidencyTier: use DEVICE (1), HOST (2) or DISK (3)")
    return Tier(value)
