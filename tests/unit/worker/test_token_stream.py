"""Chunked token streams (services/worker/token_stream.py) through WorkerApp over a fake engine: every token exactly
once and in order, the first token alone and at once, full chunks, the hold window, and cancellation with tokens
held still freeing the engine's sequence and the delta's pin."""

import asyncio
import threading
import time

import pytest

from deltazip.model.sampling import SamplingParams
from services.worker.app import GenerateInput, WorkerApp, WorkerInfo
from services.worker.engine_loop import EngineLoop, TokenEvent
from services.worker.residency import ResidencyLimits, ResidencyManager
from services.worker.token_stream import Mailbox, StreamPolicy
from tests.unit.worker.test_worker_app import ByteTokenizer, FakeEngine, SlowIO, wait_until


class PacedEngine(FakeEngine):
    """FakeEngine whose steps take `step_s`."""

    def __init__(self, is_ready, step_s: float):
        super().__init__(is_ready)
        self.step_s = step_s

    def step(self):
        time.sleep(max(0.0, self.step_s - 0.002))
        return super().step()


def make_app(policy: StreamPolicy, step_s: float = 0.002):
    io = SlowIO()
    io.gate.set()
    residency = ResidencyManager(ResidencyLimits(2, 0, 1000, 1000), io)
    engine = PacedEngine(residency.is_ready, step_s)
    loop = EngineLoop(engine, idle_wait_s=0.005)
    app = WorkerApp(WorkerInfo("w1", "base", "sha256:x", "cpu", "delta", max_model_len=256), ByteTokenizer(), loop,
                    residency, policy)
    loop.start()
    return app, engine, loop, residency


@pytest.fixture
def make():
    made = []

    def build(policy: StreamPolicy, step_s: float = 0.002):
        made.append(make_app(policy, step_s))
        return made[-1]

    yield build
    for _, _, loop, residency in made:
        loop.stop()
        residency.close()


async def timed_events(app, max_tokens: int, rid: str = "r", model: str = "base"):
    """(seconds since the call, event) for each streamed event."""
    inp = GenerateInput(request_id=rid, model=model, prompt="hi", sampling=SamplingParams(max_tokens=max_tokens,
                                                                                          temperature=0))
    start = time.perf_counter()
    return [(time.perf_counter() - start, e) async for e in app.generate(inp)]


def expected_text(num_tokens: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(num_tokens))


@pytest.mark.parametrize("chunk_tokens", [1, 3, 8, 64])
def test_every_token_once_in_order_first_alone(make, chunk_tokens):
    # 10 ms steps: the stream merges events already waiting when it wakes (by design), so "first alone" and "one
    # message per token" need the consumer to keep up; at the fixture's 2 ms a busy 2-core box (two test processes)
    # once put 2 tokens in the first chunk
    app, *_ = make(StreamPolicy(chunk_tokens=chunk_tokens, interval_ms=1000.0), step_s=0.01)
    events = [e for _, e in asyncio.run(timed_events(app, 40))]
    ids = [t for e in events for t in e.token_ids]
    assert ids == [ord(c) for c in expected_text(40)]
    assert "".join(e.text for e in events) == expected_text(40)
    assert len(events[0].token_ids) == 1  # the first token never waits for company
    assert all(len(e.token_ids) <= chunk_tokens for e in events[1:-1])
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 40
    if chunk_tokens == 1:
        assert len(events) == 40  # the old path: one message per token


def test_first_token_is_not_delayed_by_the_window(make):
    app, *_ = make(StreamPolicy(chunk_tokens=8, interval_ms=1000.0), step_s=0.02)
    events = asyncio.run(timed_events(app, 12))
    first_s, first = events[0]
    assert first.token_ids and first_s < 0.5  # 1 s window, ~20 ms steps: sent after the first step
    # the rest: one full chunk of 8, then the last 3 sent at once with the finish, well before the window ends
    assert [len(e.token_ids) for _, e in events] == [1, 8, 3]
    assert events[-1][0] < 0.9


def test_window_sends_a_partial_chunk(make):
    app, *_ = make(StreamPolicy(chunk_tokens=1000, interval_ms=40.0), step_s=0.01)
    events = [e for _, e in asyncio.run(timed_events(app, 30))]
    assert "".join(e.text for e in events) == expected_text(30)
    assert len(events) >= 4  # first, at least two window flushes over ~300 ms, the last
    assert all(len(e.token_ids) < 29 for e in events)


def test_cancel_with_tokens_held_aborts_and_unpins(make):
    app, engine, _, residency = make(StreamPolicy(chunk_tokens=1000, interval_ms=1000.0), step_s=0.005)

    async def cancel_after_first():
        seen = []

        async def consume():
            inp = GenerateInput(request_id="c", model="ft", prompt="hi", sampling=SamplingParams(max_tokens=200,
                                                                                                temperature=0))
            async for event in app.generate(inp):
                seen.append(event)

        task = asyncio.ensure_future(consume())
        assert await asyncio.to_thread(wait_until, lambda: seen)
        await asyncio.sleep(0.1)  # tokens are now held for the window
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    seen = asyncio.run(cancel_after_first())
    assert len(seen) == 1
    assert wait_until(lambda: "c" in engine.aborted) and wait_until(lambda: residency.entry("ft").pins == 0)


def test_mailbox_keeps_each_queue_in_order_across_threads():
    async def body():
        mailbox = Mailbox(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(4)]
        sinks = [mailbox.sink(q) for q in queues]

        def engine_thread():
            for step in range(200):
                for sink in sinks:
                    sink(TokenEvent([step], "", step == 199, "length" if step == 199 else None, 0.0))

        thread = threading.Thread(target=engine_thread)
        thread.start()
        got = [[] for _ in queues]
        for q, out in zip(queues, got):
            while not out or not out[-1].finished:
                out.append(await asyncio.wait_for(q.get(), 5))
        thread.join()
        return got

    for events in asyncio.run(body()):
        assert [e.token_ids[0] for e in events] == list(range(200))


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="stream-chunk-tokens"):
        StreamPolicy(chunk_tokens=0)
    with pytest.raises(ValueError, match="stream-interval-ms"):
        StreamPolicy(interval_ms=-1)
