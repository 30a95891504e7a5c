"""Scheduler as a real process with real Redis; workers are in-test fakes (see fake_worker.py)."""

import asyncio
import time

import grpc
import pytest
import redis

from deltazip.client import Client, InvalidArgumentError, NotFoundError, UnavailableError
from deltazip.client.errors import DeadlineExceededError
from deltazip.cluster.connection import connect
from deltazip.cluster.models import ModelRecord, ModelRegistry
from deltazip.cluster.workers import Tier
from deltazip.rpc.ports import free_port
from tests.integration.fake_worker import TOO_LONG_MESSAGE, FakeWorker, publish
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def register(redis_url: str, *names: str, base: str = "tiny-base", identity: str = "id-base") -> None:
    async def body():
        r = connect(redis_url)
        registry = ModelRegistry(r)
        await registry.set_base(base, identity)
        for name in names:
            await registry.register(ModelRecord(name, base_identity="id-base", artifact_bytes=10, compression="4bit-2:4-g128"))
        await r.aclose()

    asyncio.run(body())


@pytest.fixture
def fakes():
    started: list[FakeWorker] = []

    def make(worker_id: str, mode: str = "echo") -> FakeWorker:
        started.append(FakeWorker(worker_id, mode))
        return started[-1]

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def scheduler(launcher, redis_url):
    register(redis_url, "ft-a", "ft-b")
    proc = launcher.start("scheduler")
    with Client(proc.address, timeout_s=30) as client:
        yield client


def queue_counts(redis_url: str, model: str) -> tuple[int, int]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    return r.zcard(f"dz:queue:{model}:pending"), r.zcard(f"dz:queue:{model}:running")


def request_record(redis_url: str, request_id: str) -> dict:
    return redis.Redis.from_url(redis_url, decode_responses=True).hgetall(f"dz:request:{request_id}")


def test_unknown_model_is_not_found(scheduler):
    with pytest.raises(NotFoundError, match="not registered; push it with `deltazip push`"):
        scheduler.generate("nope", "hello")


@pytest.mark.parametrize("sampling, fragment", [
    ({"temperature": 5.0}, "temperature=5 is out of range"),
    ({"top_p": 0.0}, "top_p=0 is out of range"),
    ({"max_tokens": 10**6}, "exceeds this scheduler's limit"),
    ({"max_tokens": 2, "min_tokens": 3}, "min_tokens=3 is larger than max_tokens=2"),
])
def test_bad_sampling_is_invalid_argument(scheduler, sampling, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        scheduler.generate("ft-a", "hello", **sampling)


def test_empty_prompt_is_invalid_argument(scheduler):
    with pytest.raises(InvalidArgumentError, match="prompt is empty"):
        scheduler.generate("ft-a", "")


def test_no_live_worker_is_unavailable(scheduler):
    with pytest.raises(UnavailableError, match="no live worker.*python -m services.worker"):
        scheduler.generate("ft-a", "hello")


def test_routes_to_worker_holding_delta_and_relays(scheduler, redis_url, fakes):
    cold, warm = fakes("w-cold"), fakes("w-warm")
    publish(redis_url, "w-cold", cold.address)
    publish(redis_url, "w-warm", warm.address, {Tier.DEVICE: ["ft-a"], Tier.HOST: ["ft-a"]})
    for _ in range(3):
        out = scheduler.generate("ft-a", "one two three", max_tokens=8, request_id=None)
        assert (out.text, out.token_ids, out.finish_reason, out.worker_id) == ("one two three ", [0, 1, 2], "stop", "w-warm")
        assert out.usage.completion_tokens == 3
    assert len(warm.requests) == 3 and not cold.requests
    assert warm.requests[0].sampling.max_tokens == 8 and warm.requests[0].attempt == 1
    record = request_record(redis_url, out.request_id)
    assert (record["state"], record["worker_id"], record["attempts"]) == ("finished", "w-warm", "1")
    assert queue_counts(redis_url, "ft-a") == (0, 0)


def test_base_model_and_chat_and_stream(scheduler, redis_url, fakes):
    w = fakes("w1")
    publish(redis_url, "w1", w.address)
    assert scheduler.generate("tiny-base", "a b").text == "a b "
    assert scheduler.chat("ft-b", [{"role": "user", "content": "hi"}]).text == "hi "
    tokens = list(scheduler.stream("ft-b", "x y"))
    assert [t.text for t in tokens] == ["x ", "y ", ""] and tokens[-1].finish_reason == "stop"
    assert [m.name for m in scheduler.models()] == ["tiny-base", "ft-a", "ft-b"]
    assert scheduler.models()[0].is_base and scheduler.get_model("ft-a").compression == "4bit-2:4-g128"


def test_retries_on_another_worker_before_first_token(scheduler, redis_url, fakes):
    bad, good = fakes("w-bad", "fail_before"), fakes("w-good")
    publish(redis_url, "w-bad", bad.address, {Tier.DEVICE: ["ft-a"]})  # preferred by affinity, then fails
    publish(redis_url, "w-good", good.address)
    publish(redis_url, "w-dead", f"127.0.0.1:{free_port()}", {Tier.HOST: ["ft-a"]})  # listed but gone
    out = scheduler.generate("ft-a", "p q")
    assert out.worker_id == "w-good" and out.text == "p q "
    assert request_record(redis_url, out.request_id)["attempts"] == "3"


def test_failure_after_tokens_is_unavailable_and_retryable(scheduler, redis_url, fakes):
    w = fakes("w1", "fail_after")
    publish(redis_url, "w1", w.address)
    with pytest.raises(UnavailableError, match="failed after streaming 2 tokens.*can be retried"):
        scheduler.generate("ft-a", "a b c d")


def test_worker_invalid_argument_passes_through_unchanged(scheduler, redis_url, fakes):
    w, other = fakes("w1", "too_long"), fakes("w2")
    publish(redis_url, "w1", w.address, {Tier.DEVICE: ["ft-a"]})
    publish(redis_url, "w2", other.address)
    with pytest.raises(InvalidArgumentError) as err:
        scheduler.generate("ft-a", "long prompt")
    assert err.value.message == TOO_LONG_MESSAGE
    assert not other.requests  # not retried: the request itself is at fault


def test_client_cancel_cancels_worker_call(scheduler, redis_url, fakes):
    w = fakes("w1", "slow")
    publish(redis_url, "w1", w.address)
    stream = scheduler.stream("ft-a", "x", request_id="req-cancel")
    assert next(stream).token_ids == [0]
    stream.close()
    assert w.cancelled.wait(5), "the worker's stream was not cancelled"
    deadline = time.monotonic() + 5
    while request_record(redis_url, "req-cancel").get("state") != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request_record(redis_url, "req-cancel")["state"] == "cancelled"


def test_client_deadline_reaches_worker(scheduler, redis_url, fakes):
    w = fakes("w1", "slow")
    publish(redis_url, "w1", w.address)
    with pytest.raises(DeadlineExceededError):
        scheduler.generate("ft-a", "x", timeout_s=0.5)
    assert w.cancelled.wait(5)


def test_prefetch_loads_on_chosen_worker(scheduler, redis_url, fakes):
    w = fakes("w1")
    publish(redis_url, "w1", w.address)
    assert scheduler.prefetch("ft-b", tier="host") == ["w1"]
    assert w.loads[0].model == "ft-b"
    with pytest.raises(InvalidArgumentError, match="base model"):
        scheduler.prefetch("tiny-base")
    with pytest.raises(NotFoundError):
        scheduler.prefetch("nope")


def test_reflection_and_health_are_served(scheduler):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(scheduler.address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"deltazip.v1.Scheduler", "grpc.health.v1.Health"} <= names
    channel.close()


def test_cli_push_models_generate_through_store_and_scheduler(launcher, redis_url, fakes, tmp_path, capsys, monkeypatch):
    from deltazip.cli import main
    from tests.integration.test_store import make_artifact

    register(redis_url, identity="abc123")  # base only; the fine-tune arrives through the store
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    sched = launcher.start("scheduler")
    w = fakes("w1")
    publish(redis_url, "w1", w.address)
    monkeypatch.setenv("DELTAZIP_SCHEDULER", sched.address)
    art = make_artifact(tmp_path / "art", shard_bytes=(2000, 10))

    assert main(["push", str(art), "--name", "ft-cli", "--store", store.address, "--quiet"]) == 0
    assert "pushed ft-cli" in capsys.readouterr().out
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-base" in listing and "ft-cli" in listing and "4bit-2:4-g128" in listing
    assert main(["generate", "--model", "ft-cli", "hello world", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == "hello world \n"
    assert main(["generate", "--model", "ft-cli", "a b", "--stream"]) == 0
    assert capsys.readouterr().out == "a b \n"
    assert main(["generate", "--model", "missing", "x"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["stat", "ft-cli", "--store", store.address]) == 0
    assert "delta-00001.safetensors" in capsys.readouterr().out
    assert main(["delete", "ft-cli", "--store", store.address]) == 0
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    assert "ft-cli" not in capsys.readouterr().out


def test_redis_outage_is_unavailable(scheduler, redis_proc):
    from tests.integration.procs import stop

    stop(redis_proc)
    with pytest.raises(UnavailableError, match="cannot reach Redis.*--redis-url"):
        scheduler.generate("ft-a", "hello", timeout_s=20)
    with pytest.raises(UnavailableError, match="cannot reach Redis"):
        scheduler.models()


def test_async_client_concurrent_requests_spread_and_replicas_are_interchangeable(launcher, redis_url, fakes):
    from deltazip.client import AsyncClient
    from tests.integration.procs import stop

    register(redis_url, "ft-a")
    first, second = launcher.start("scheduler"), launcher.start("scheduler")
    a, b = fakes("wa"), fakes("wb")
    publish(redis_url, "wa", a.address)
    publish(redis_url, "wb", b.address)

    async def burst(address: str) -> list[str]:
        async with AsyncClient(address, timeout_s=30) as client:
            outs = await asyncio.gather(*(client.generate("ft-a", f"req {i}") for i in range(12)))
            streamed = [t.text async for t in client.stream("ft-a", "s t")]
            assert streamed == ["s ", "t ", ""]
            return [o.worker_id for o in outs]

    assert set(asyncio.run(burst(first.address))) == {"wa", "wb"}
    stop(first)  # schedulers keep no state: the other replica carries on
    assert len(asyncio.run(burst(second.address))) == 12
    assert queue_counts(redis_url, "ft-a") == (0, 0)


def test_delta_for_another_base_is_failed_precondition(scheduler, redis_url, fakes):
    from deltazip.client import FailedPreconditionError

    async def body():
        r = connect(redis_url)
        await ModelRegistry(r).register(ModelRecord("ft-other", base_identity="id-other"))
        await r.aclose()

    asyncio.run(body())
    with pytest.raises(FailedPreconditionError, match="compress it again against this base"):
        scheduler.generate("ft-other", "hi")


def test_full_queues_are_resource_exhausted_with_retry_advice(launcher, redis_url, fakes):
    from deltazip.client import ResourceExhaustedError

    register(redis_url, "ft-a")
    sched = launcher.start("scheduler", "--max-queue-per-worker", "1", "--retry-after-s", "2")
    a, b = fakes("wa", "slow"), fakes("wb", "slow")
    publish(redis_url, "wa", a.address)
    publish(redis_url, "wb", b.address)
    with Client(sched.address, timeout_s=30) as client:
        streams = [client.stream("ft-a", "x") for _ in range(2)]
        assert [next(s).token_ids for s in streams] == [[0], [0]]  # one on each worker: both queues full
        with pytest.raises(ResourceExhaustedError, match=r"all 2 live worker\(s\) are at their queue limit.*retry after 2 s"):
            client.generate("ft-a", "y")
        streams[0].close()
        deadline = time.monotonic() + 5  # the closed stream's place is given back
        while time.monotonic() < deadline:
            try:
                assert next(client.stream("ft-a", "y")).token_ids == [0]
                break
            except ResourceExhaustedError:
                time.sleep(0.1)
        else:
            raise AssertionError("a freed queue place was never reused")
        streams[1].close()
    assert {len(a.requests), len(b.requests)} <= {1, 2} and len(a.requests) + len(b.requests) == 3


def test_request_waiting_on_a_worker_whose_heartbeat_expires_is_rerouted(launcher, redis_url, fakes):
    register(redis_url, "ft-a")
    sched = launcher.start("scheduler", "--worker-check-s", "0.2", "--lease-s", "2")
    hung, good = fakes("w-hung", "hang"), fakes("w-good")
    publish(redis_url, "w-hung", hung.address, {Tier.DEVICE: ["ft-a"]}, ttl_s=1.5)  # preferred, then silent
    publish(redis_url, "w-good", good.address)
    with Client(sched.address, timeout_s=30) as client:
        out = client.generate("ft-a", "p q", request_id="req-rerouted")
    assert (out.worker_id, out.text) == ("w-good", "p q ")
    record = request_record(redis_url, "req-rerouted")
    assert (record["state"], record["attempts"], record["worker_id"]) == ("finished", "2", "w-good")
    assert hung.cancelled.wait(5) and len(hung.requests) == 1


def test_worker_dying_after_tokens_ends_unavailable_retryable(launcher, redis_url, fakes):
    register(redis_url, "ft-a")
    sched = launcher.start("scheduler", "--worker-check-s", "0.2", "--lease-s", "2")
    slow = fakes("w-slow", "slow")
    publish(redis_url, "w-slow", slow.address, ttl_s=1.0)
    with Client(sched.address, timeout_s=30) as client:
        with pytest.raises(UnavailableError, match="w-slow failed after streaming .* tokens.*heartbeat expired.*can be retried"):
            client.generate("ft-a", "x", request_id="req-lost-worker")
    assert request_record(redis_url, "req-lost-worker")["state"] == "failed"


def test_retry_with_same_request_id_continues_attempts(scheduler, redis_url, fakes):
    w = fakes("w1")
    publish(redis_url, "w1", w.address)
    for _ in range(2):
        assert scheduler.generate("ft-a", "a b", request_id="req-same").text == "a b "
    assert [r.attempt for r in w.requests] == [1, 2]  # the worker never sees one attempt id twice
    record = request_record(redis_url, "req-same")
    assert (record["state"], record["attempts"]) == ("finished", "2")
