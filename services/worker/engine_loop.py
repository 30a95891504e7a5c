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

from deltazip import metrics
from deltazip.logs import get_logger
from services.worker.engine.step_profile import StepProfile

log = get_logger("services.worker.engine_loop")
IDLE_SLICE_S = 0.1  # longest single idle wait with no requests (a submit wakes the loop at once anyway)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """New tokens of one request after a step (engine-neutral)."""

    request_id: str
    token_ids: list[int]
    text: str = ""  # detokenized by the engine; never part of a stop sequence
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: list[int]
    text: str
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
    running_deltas: frozenset[str] = frozenset()  # deltas with a sequence holding KV blocks


class Engine(Protocol):
    """What the loop needs from the engine core (services/worker/engine via engine_adapter). Optional:
    `warm_up() -> bool`, called when no request is open (compiling kernels ahead; True: it worked, look again)."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: Any, delta: str | None) -> None:
        """Thread-safe; ValueError when the request cannot run."""

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def step_phases(self) -> dict[str, tuple[int, float]]:
        """{phase: (count, seconds)} since start (services/worker/engine/step_profile.py)."""


Sink = Callable[[TokenEvent], None]


@dataclass(slots=True)
class _LoopState:
    sinks: dict[str, Sink] = field(default_factory=dict)  # guarded by EngineLoop._lock
    stats: EngineStats = EngineStats()


class EngineLoop:
    """Owns the engine; every engine call happens on its thread."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.02,
                 on_step: Callable[[int, frozenset[str]], None] | None = None) -> None:
        self._engine = engine
        self._on_step = on_step or (lambda step, running: None)  # residency: free draining slots
        self._num_steps = 0
        self._aborts: queue.SimpleQueue[tuple[str, Callable[[], None] | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = _LoopState(stats=engine.stats())
        self.profile = StepProfile()  # this loop's own phases: deliver, idle
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        metrics.KERNELS_WARMING.set_function(lambda: float(self.kernels_warming()))  # read at each scrape
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: Any, delta: str | None,
               sink: Sink) -> None:
        """Queue a request (ValueError if the engine refuses it); its tokens arrive through `sink`."""
        if self.error is not None:
            raise RuntimeError(f"engine loop stopped: {self.error!r}")
        with self._lock:
            if request_id in self._state.sinks:
                raise ValueError(f"request id {request_id!r} is already running on this worker")
            self._state.sinks[request_id] = sink
        try:
            self._engine.add_request(request_id, prompt_token_ids, sampling, delta)
        except Exception:
            with self._lock:
                self._state.sinks.pop(request_id, None)
            raise
        self._wake.set()

    def abort(self, request_id: str, then: Callable[[], None] | None = None) -> None:
        """Stop a request and free its KV blocks (no more events are sent for it); no-op once finished.

        `then` runs on the loop thread once the engine has dropped the request (e.g. to unpin its delta).
        """
        with self._lock:
            known = self._state.sinks.pop(request_id, None) is not None
        if known:
            self._aborts.put((request_id, then))  # the engine call happens on the loop thread, between steps
            self._wake.set()
        elif then is not None:
            then()

    def wakeup(self) -> None:
        """Something changed outside (a delta became ready): run a step soon."""
        self._wake.set()

    @property
    def stats(self) -> EngineStats:
        return self._state.stats

    def step_phases(self) -> dict[str, tuple[int, float]]:
        """{phase: (count, seconds)} since start: the engine's step phases plus this loop's deliver and idle."""
        return {**self._engine.step_phases(), **{k: v for k, v in self.profile.snapshot().items() if v[0]}}

    def delta_segments(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(step kind, row bin): (segments, rows)} since start (step_profile.SegmentStats; engines that keep none:
        empty)."""
        segments = getattr(self._engine, "delta_segments", None)
        return segments() if segments is not None else {}

    def kernels_warming(self) -> bool:
        """Whether the engine still has kernel warm-up work (engines without warm-up: never)."""
        warming = getattr(self._engine, "kernels_warming", None)
        return bool(warming()) if warming is not None else False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before looking for work, so a wakeup during the step is not lost
                self._receive()
                if not self._engine.has_unfinished_requests():
                    warm_up = getattr(self._engine, "warm_up", None)  # kernels for new delta stacks, while idle
                    if warm_up is not None and warm_up():
                        continue
                    with self.profile.timed("idle"):  # short waits: a profile interval's edges cut few of them
                        self._wake.wait(IDLE_SLICE_S)
                    continue
                start = time.perf_counter()
                outputs = self._engine.step()
                self._num_steps += 1
                with self.profile.timed("deliver"):
                    self._process(outputs, (time.perf_counter() - start) * 1e3)
                    self._state.stats = self._engine.stats()
                    metrics.observe_batch(self._state.stats.num_running, len(self._state.stats.running_deltas))
                    self._on_step(self._num_steps, self._state.stats.running_deltas)
                if not outputs:  # everything waits (e.g. for a delta load): do not spin
                    with self.profile.timed("idle"):
                        self._wake.wait(self._idle_wait_s)
        except BaseException as exc:  # the loop must not die silently: fail every open request
            self.error = exc
            log.exception("engine_loop_crashed")
            with self._lock:
                sinks, self._state.sinks = list(self._state.sinks.values()), {}
            for sink in sinks:
                sink(TokenEvent([], "", True, "error", 0.0))

    def _receive(self) -> None:
        while True:
            try:
                request_id, then = self._aborts.get_nowait()
            except queue.Empty:
                break
            self._engine.abort(request_id)
            if then is not None:
                then()
        self._state.stats = self._engine.stats()

    def _process(self, outputs: list[StepOutput], step_ms: float) -> None:
        metrics.GENERATED_TOKENS.labels("worker").inc(sum(len(out.token_ids) for out in outputs))  # once per step
        with self._lock:  # once per step, not per request: the sinks of this step's requests
            sinks = [self._state.sinks.get(out.request_id) for out in outputs]
            for out in outputs:
                if out.finished:
                    self._state.sinks.pop(out.request_id, None)
        for out, sink in zip(outputs, sinks):
            if sink is None:
                continue  # aborted meanwhile
            try:
                sink(TokenEvent(list(out.token_ids), out.text, out.finished, out.finish_reason, step_ms))
            except Exception:  # one broken listener must not stop the batch
                log.exception("sink_failed", request_id=out.request_id)
                with self._lock:
                    self._state.sinks.pop(out.request_id, None)
                self._engine.abort(out.request_id)
