"""WorkerApp: the worker's domain core — generate / load / evict / status as plain async functions.

The gRPC servicer only translates protos to these calls. Requests of every model go to one
EngineLoop; a request for a delta pins it and asks the ResidencyManager to bring it to the device
in the background, while the engine keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from deltazip.logs import get_logger
from deltazip.model.sampling import SamplingParams
from services.worker.engine_loop import EngineLoop, EngineStats, TokenEvent
from services.worker.errors import InvalidRequestError, as_service_error
from services.worker.residency import DeltaState, ResidencyManager, ResidentDelta, Tier
from services.worker.token_stream import Chunker, Mailbox, StreamPolicy

log = get_logger("services.worker")

# No tokenizer packs more bytes into one token: a longer prompt cannot fit the context. Tokenizing a few MiB holds
# the GIL for seconds, long enough for the worker's heartbeat to expire, so such prompts are refused unread.
MAX_PROMPT_BYTES_PER_TOKEN = 64


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str
    model: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    sampling: SamplingParams = SamplingParams()
    attempt: int = 0  # the scheduler's retry number: a retry never collides with its earlier attempt

    @property
    def engine_id(self) -> str:
        return self.request_id if not self.attempt else f"{self.request_id}/{self.attempt}"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float
    queue_ms: float


@dataclass(frozen=True, slots=True)
class GenerateEvent:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # stop | length | cancelled (last event only)
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    base_name: str
    base_identity: str
    device: str
    mode: str
    max_model_len: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    info: WorkerInfo
    stats: EngineStats
    deltas: list[ResidentDelta]
    step_phases: dict[str, tuple[int, float]]  # {phase: (count, seconds)} since start
    kernels_warming: bool = False  # kernel warm-up work left (the engine's GEMM buckets, SBMM variants)
    delta_segments: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # SegmentStats snapshot
    merged_cache: dict | None = None  # MergedCache.stats() (services/worker/merged_cache.py); None: off


class WorkerApp:
    """Everything a Worker RPC does, without gRPC."""

    def __init__(self, info: WorkerInfo, tokenizer, loop: EngineLoop, residency: ResidencyManager,
                 stream: StreamPolicy = StreamPolicy(), merged_cache=None) -> None:
        self.info = info
        self._merged_cache = merged_cache  # services/worker/merged_cache.py MergedCache, or None (Status reads it)
        self._tokenizer = tokenizer
        self._loop = loop
        self._residency = residency
        self._stream_policy = stream
        self._mailbox: Mailbox | None = None  # of the event loop serving requests

    # ---- Generate ------------------------------------------------------------------------------
    def delta_of(self, model: str) -> str | None:
        """None for the base model, else the delta's name."""
        return None if model in ("", self.info.base_name) else model

    def encode(self, inp: GenerateInput) -> list[int]:
        if inp.messages is not None:
            messages = [{"role": r, "content": c} for r, c in inp.messages]
            return list(self._tokenizer.encode_chat(messages))
        return list(self._tokenizer.encode(inp.prompt or ""))

    def admit(self, inp: GenerateInput) -> tuple[list[int], SamplingParams]:
        """Tokenize and check the request against the context limit; raises InvalidRequestError."""
        limit = self.info.max_model_len
        num_bytes = sum(len(c.encode()) for _, c in inp.messages) if inp.messages else len((inp.prompt or "").encode())
        if num_bytes > limit * MAX_PROMPT_BYTES_PER_TOKEN:  # cannot fit: refuse before tokenizing, which holds the GIL
            raise InvalidRequestError(
                f"prompt is {num_bytes} bytes, far more than the context limit of {limit} tokens can hold; "
                "shorten the prompt")
        try:
            prompt_ids = self.encode(inp)
        except ValueError as exc:  # e.g. chat messages for a model without a chat template
            raise InvalidRequestError(str(exc)) from exc
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty; send at least one token of text")
        if len(prompt_ids) >= limit:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens but the context limit is {limit} tokens "
                f"(prompt + at least 1 generated); shorten the prompt")
        sampling = inp.sampling
        room = limit - len(prompt_ids)
        if sampling.max_tokens > room:  # finishes with LENGTH at the context limit
            sampling = _replace_sampling(sampling, max_tokens=room, min_tokens=min(sampling.min_tokens, room))
        return prompt_ids, sampling

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateEvent]:
        """Stream one request's tokens; aborting the iterator (cancel/deadline) aborts the sequence."""
        start = time.perf_counter()
        prompt_ids, sampling = self.admit(inp)
        delta = self.delta_of(inp.model)
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        ready = None
        if delta is not None:
            self._residency.pin(delta)
            ready = asyncio.wrap_future(self._residency.ensure(delta, Tier.DEVICE))
            ready.add_done_callback(self._on_ready)
        submitted = finished = False
        try:
            try:
                self._loop.submit(inp.engine_id, prompt_ids, sampling, delta, self._sink(events))
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from exc
            submitted = True
            async with contextlib.aclosing(self._stream(inp, prompt_ids, events, ready, start)) as stream:
                async for event in stream:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            # The delta stays pinned until the engine has dropped the sequence, so its slot cannot be
            # reused while a step might still run it.
            unpin = (lambda: self._residency.unpin(delta)) if delta is not None else None
            if submitted and not finished:  # cancelled, deadline, or the delta failed to load
                self._loop.abort(inp.engine_id, then=unpin)
                log.info("request_aborted", request_id=inp.request_id, model=inp.model)
            elif unpin is not None:
                unpin()

    def _on_ready(self, future: asyncio.Future) -> None:
        self._loop.wakeup()
        if not future.cancelled():
            future.exception()  # retrieved: a failure after the request went away is not "never retrieved"

    def _sink(self, events: asyncio.Queue):
        aio_loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.aio_loop is not aio_loop:
            self._mailbox = Mailbox(aio_loop)
        return self._mailbox.sink(events)

    async def _stream(self, inp: GenerateInput, prompt_ids: list[int], events: asyncio.Queue,
                      ready: asyncio.Future | None, start: float) -> AsyncIterator[GenerateEvent]:
        """One event per chunk (token_stream.Chunker): the first token at once, later ones gathered."""
        chunker = Chunker(self._stream_policy, events)
        num_tokens, first_ms, queue_ms = 0, 0.0, 0.0
        try:
            while True:
                chunker.add(await self._next_event(events, ready))
                if not chunker.ready():
                    continue
                token_ids, texts, reason = [], [], None
                for event in chunker.take():
                    if event.finish_reason == "error":
                        raise as_service_error(self._loop.error or RuntimeError("engine loop stopped"))
                    if num_tokens == 0 and event.token_ids:
                        first_ms = (time.perf_counter() - start) * 1e3
                        queue_ms = max(0.0, first_ms - event.step_ms)  # waiting before the step that prefilled it
                    num_tokens += len(event.token_ids)
                    token_ids += event.token_ids
                    texts.append(event.text)
                    reason = _finish_reason(event)
                if reason is None:
                    yield GenerateEvent(token_ids, "".join(texts))
                    continue
                total_ms = (time.perf_counter() - start) * 1e3
                usage = Usage(len(prompt_ids), num_tokens, first_ms, total_ms, queue_ms)
                log.info("request_finished", request_id=inp.request_id, model=inp.model, worker=self.info.worker_id,
                         finish_reason=reason, prompt_tokens=len(prompt_ids), completion_tokens=num_tokens,
                         ttft_ms=round(first_ms, 2), total_ms=round(total_ms, 2))
                yield GenerateEvent(token_ids, "".join(texts), reason, usage)
                return
        finally:
            chunker.close()

    async def _next_event(self, events: asyncio.Queue, ready: asyncio.Future | None) -> TokenEvent:
        """The next token event; raises the delta's load error if loading fails first."""
        if ready is None or (ready.done() and ready.exception() is None):
            return await events.get()
        getter = asyncio.ensure_future(events.get())
        try:
            await asyncio.wait([getter, ready], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getter.cancel()
            raise
        if getter.done():
            return getter.result()
        getter.cancel()
        exc = ready.exception()
        if exc is not None:
            raise as_service_error(exc)
        return await events.get()

    # ---- LoadDelta / EvictDelta / Status -------------------------------------------------------
    async def load_delta(self, model: str, tier: Tier) -> ResidentDelta:
        """Bring a delta to `tier` (DEVICE or HOST); raises the fetch/load error."""
        delta = self.delta_of(model)
        if delta is None:
            raise InvalidRequestError(f"{model!r} is the base model; it is always loaded")
        try:
            return await asyncio.wrap_future(self._residency.ensure(delta, tier))
        except Exception as exc:
            raise as_service_error(exc) from exc

    def load_ms(self, model: str) -> float:
        """How long the last host→device copy of `model` took (0 when unknown)."""
        delta = self.delta_of(model)
        return self._residency.load_ms(delta) if delta is not None else 0.0

    def evict_delta(self, model: str, tier: Tier) -> bool:
        delta = self.delta_of(model)
        return delta is not None and self._residency.evict(delta, tier)

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.info, self._loop.stats, self._residency.snapshot(), self._loop.step_phases(),
                            self._loop.kernels_warming(), self._loop.delta_segments(),
                            self._merged_cache.stats() if self._merged_cache is not None else None)

    def on_residency_change(self, snap: ResidentDelta) -> None:
        if snap.state is DeltaState.ON_DEVICE:
            self._loop.wakeup()


def _finish_reason(event: TokenEvent) -> str | None:
    if not event.finished:
        return None
    return {"abort": "cancelled"}.get(event.finish_reason or "", event.finish_reason or "stop")


def _replace_sampling(sampling: SamplingParams, **changes) -> SamplingParams:
    values = {name: getattr(sampling, name) for name in sampling.__dataclass_fields__}
    return SamplingParams(**{**values, **changes})


def sampling_from_fields(max_tokens: int, temperature: float | None, top_p: float | None, top_k: int,
                         seed: int | None, stop: Sequence[str], ignore_eos: bool, min_tokens: int,
                         default_max_tokens: int) -> SamplingParams:
    """Build validated SamplingParams; raises InvalidRequestError naming the bad field."""
    try:
        return SamplingParams(
            max_tokens=max_tokens or default_max_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=top_k, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos, min_tokens=min_tokens)
    except ValueError as exc:
        raise InvalidRequestError(f"bad sampling parameters: {exc}") from exc
