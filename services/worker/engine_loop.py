"""EngineLoop: runs the engine in one background thread — receive → step → deliver — forever.

Requests of every model share one engine (one batch); a request whose delta is not on the device
simply is not scheduled by the engine yet. Other threads talk to the loop only through `submit`,
`abort` and `wakeup`; outputs go back through each request's `sink` callback (thread-safe).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deltazip.logs import get_logger

log = get_logger("services.worker.engine_loop")


@dataclass(frozen=True, slots=True)
class StepOutput:
    """New tokens of one request after a step (engine-neutral)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    step_ms: float  # duration of the step that produced these tokens


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    queued_tokens: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0


class Engine(Protocol):
    """What the loop needs from the engine core (services/worker/engine via engine_adapter)."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: Any, delta: str | None) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...


Sink = Callable[[TokenEvent], None]


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: Any
    delta: str | None
    sink: Sink


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _LoopState:
    sinks: dict[str, Sink] = field(default_factory=dict)
    stats: EngineStats = EngineStats()


class EngineLoop:
    """Owns the engine; every engine call happens on its thread."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.02) -> None:
        self._engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = _LoopState(stats=engine.stats())
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: Any, delta: str | None,
               sink: Sink) -> None:
        """Queue a request; its tokens arrive through `sink` on the loop thread."""
        self._inbox.put(_Add(request_id, prompt_token_ids, sampling, delta, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (no more events are sent for it)."""
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def wakeup(self) -> None:
        """Something changed outside (a delta became ready): run a step soon."""
        self._wake.set()

    @property
    def stats(self) -> EngineStats:
        return self._state.stats

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._receive()
                if not self._engine.has_unfinished():
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                start = time.perf_counter()
                outputs = self._engine.step()
                self._process(outputs, (time.perf_counter() - start) * 1e3)
                self._state.stats = self._engine.stats()
                if not outputs:  # everything waits (e.g. for a delta load): do not spin
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as exc:  # the loop must not die silently: fail every open request
            self.error = exc
            log.exception("engine_loop_crashed")
            for sink in self._state.sinks.values():
                sink(TokenEvent([], True, "error", 0.0))
            self._state.sinks.clear()

    def _receive(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, _Add):
                self._state.sinks[msg.request_id] = msg.sink
                self._engine.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.delta)
            elif msg.request_id in self._state.sinks:
                del self._state.sinks[msg.request_id]
                self._engine.abort(msg.request_id)
        self._state.stats = self._engine.stats()

    def _process(self, outputs: list[StepOutput], step_ms: float) -> None:
        for out in outputs:
            sink = self._state.sinks.get(out.request_id)
            if sink is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._state.sinks[out.request_id]
            try:
                sink(TokenEvent(list(out.token_ids), out.finished, out.finish_reason, step_ms))
            except Exception:  # one broken listener must not stop the batch
                log.exception("sink_failed", request_id=out.request_id)
                if self._state.sinks.pop(out.request_id, None) is not None:
                    self._engine.abort(out.request_id)
