"""WorkerApp over a fake engine: streaming, stop strings, context limit, waiting for a delta, cancellation."""

import asyncio
import threading
import time

import pytest

from deltazip.model.sampling import SamplingParams
from deltazip.rpc.errors import InvalidArgument, NotFound
from services.worker.app import GenerateInput, WorkerApp, WorkerInfo
from services.worker.engine_loop import EngineLoop, EngineStats, StepOutput
from services.worker.errors import DeltaNotFoundError
from services.worker.residency import ResidencyLimits, ResidencyManager, Tier


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def encode_chat(self, messages):
        raise ValueError("this model has no chat template (tokenizer_config.json chat_template); send a prompt")

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class FakeEngine:
    """Emits 'abcdef...' one token per step for every request whose delta is ready; 'z' in the prompt = stop."""

    def __init__(self, is_ready):
        self.is_ready = is_ready
        self.reqs = {}
        self.aborted = []

    def add_request(self, request_id, prompt_token_ids, sampling, delta):
        if request_id in self.reqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.reqs[request_id] = [sampling, delta, 0, ord("z") in prompt_token_ids]

    def abort(self, request_id):
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def stats(self):
        return EngineStats(num_running=len(self.reqs), free_kv_blocks=10, total_kv_blocks=10)

    def step_phases(self):
        return {}

    def step(self):
        time.sleep(0.002)  # a step takes time: aborts can arrive before the request finishes
        outs = []
        for rid, st in list(self.reqs.items()):
            sampling, delta, n, stop_early = st
            if delta is not None and not self.is_ready(delta):
                continue
            st[2] += 1
            stop = stop_early and st[2] == 2
            done = stop or st[2] >= sampling.max_tokens
            token = ord("a") + n % 26
            reason = "stop" if stop else "length" if done else None
            outs.append(StepOutput(rid, [token], "" if stop else chr(token), done, reason))
            if done:
                del self.reqs[rid]
        return outs


class SlowIO:
    def __init__(self):
        self.gate = threading.Event()

    def fetch(self, name):
        if name == "missing":
            raise DeltaNotFoundError(f"model {name!r} is not in any delta store")
        self.gate.wait(5)
        return "/x", 10

    def load_host(self, name, path):
        return {}, 10

    def host_bytes_estimate(self, name, path, disk_bytes):
        return 10

    def to_device(self, name, host, slot):
        return 10

    def drop_device(self, name, slot):
        pass

    def drop_disk(self, name, path):
        pass


@pytest.fixture
def setup():
    io = SlowIO()
    residency = ResidencyManager(ResidencyLimits(2, 0, 1000, 1000), io)
    engine = FakeEngine(residency.is_ready)
    loop = EngineLoop(engine, idle_wait_s=0.005)
    info = WorkerInfo("w1", "base", "sha256:x", "cpu", "delta", max_model_len=32)
    app = WorkerApp(info, ByteTokenizer(), loop, residency)
    loop.start()
    yield app, io, engine, residency
    io.gate.set()
    loop.stop()
    residency.close()


def wait_until(cond, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


async def collect(app, **kw):
    inp = GenerateInput(request_id=kw.pop("rid", "r"), model=kw.pop("model", "base"), prompt=kw.pop("prompt", "hi"),
                        sampling=SamplingParams(temperature=0, **kw))
    return [e async for e in app.generate(inp)]


def test_stream_tokens_text_and_usage(setup):
    app, *_ = setup
    events = asyncio.run(collect(app, max_tokens=4))
    assert "".join(e.text for e in events) == "abcd"
    last = events[-1]
    assert last.finish_reason == "length" and last.usage.prompt_tokens == 2 and last.usage.completion_tokens == 4
    assert last.usage.ttft_ms > 0 and last.usage.total_ms >= last.usage.ttft_ms


def test_engine_stop_is_reported_as_stop(setup):
    app, _, engine, _ = setup
    events = asyncio.run(collect(app, prompt="zz", max_tokens=100))
    assert "".join(e.text for e in events) == "a" and events[-1].finish_reason == "stop"
    assert events[-1].usage.completion_tokens == 2


def test_duplicate_request_id_is_invalid(setup):
    app, io, engine, _ = setup

    async def twice():
        first = asyncio.ensure_future(collect(app, rid="same", model="ft", max_tokens=3))
        await asyncio.sleep(0.05)
        with pytest.raises(InvalidArgument, match="already"):
            await collect(app, rid="same", max_tokens=3)
        io.gate.set()
        return await first

    assert sum(len(e.token_ids) for e in asyncio.run(twice())) == 3  # the first request still completes


def test_prompt_too_long_names_the_limit(setup):
    app, *_ = setup
    with pytest.raises(InvalidArgument, match="context limit is 32"):
        asyncio.run(collect(app, prompt="x" * 40))


def test_max_tokens_clamped_to_context(setup):
    app, *_ = setup
    events = asyncio.run(collect(app, prompt="x" * 28, max_tokens=100))
    assert events[-1].usage.completion_tokens == 4 and events[-1].finish_reason == "length"


def test_delta_request_waits_without_blocking_base(setup):
    app, io, _, residency = setup

    async def both():
        delta_task = asyncio.ensure_future(collect(app, rid="d", model="ft", max_tokens=3))
        base_events = await collect(app, rid="b", max_tokens=3)
        assert not delta_task.done()  # still fetching
        io.gate.set()
        return base_events, await delta_task

    base_events, delta_events = asyncio.run(both())
    assert "".join(e.text for e in delta_events) == "abc"
    assert residency.is_ready("ft") and residency.entry("ft").pins == 0


def test_missing_delta_fails_request_with_not_found(setup):
    app, _, engine, _ = setup
    with pytest.raises(NotFound, match="not in any delta store"):
        asyncio.run(collect(app, model="missing"))
    assert wait_until(lambda: "r" not in engine.reqs)


def test_cancel_aborts_engine_request(setup):
    app, io, engine, residency = setup

    async def cancel_midway():
        task = asyncio.ensure_future(collect(app, rid="c", model="ft", max_tokens=5))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert wait_until(lambda: "c" in engine.aborted) and wait_until(lambda: residency.entry("ft").pins == 0)


def test_load_and_evict(setup):
    app, io, _, _ = setup
    io.gate.set()
    snap = asyncio.run(app.load_delta("ft", Tier.HOST))
    assert snap.tier is Tier.HOST
    assert asyncio.run(app.load_delta("ft", Tier.DEVICE)).tier is Tier.DEVICE
    assert [d.name for d in app.status().deltas] == ["ft"]
    assert app.evict_delta("ft", Tier.DISK) and app.status().deltas == []
    with pytest.raises(InvalidArgument):
        asyncio.run(app.load_delta("base", Tier.DEVICE))


def test_chat_without_template_is_invalid(setup):
    app, *_ = setup

    async def chat():
        inp = GenerateInput(request_id="m", model="base", messages=(("user", "hi"),))
        return [e async for e in app.generate(inp)]

    with pytest.raises(InvalidArgument, match="chat template"):
        asyncio.run(chat())
