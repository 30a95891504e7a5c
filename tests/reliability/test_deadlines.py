"""Deadlines and cancellation, checked on the worker's own state (Status RPC, EvictDelta), not only the client's.

Promise: when a client's deadline passes or it cancels (gRPC cancel, or an HTTP client hanging up on the
gateway), the worker stops generating for that request and frees its KV blocks, its running/waiting place and
its pin on the delta's slot within one engine step (the abort is applied between steps); the client sees
DEADLINE_EXCEEDED / CANCELLED; the worker keeps serving.
"""

import http.client
import json
import threading
import time

import grpc
import pytest

from deltazip.client import Client
from deltazip.client.errors import DeadlineExceededError
from deltazip.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(120)

LONG = {"max_tokens": 480, "temperature": 0.0, "ignore_eos": True}  # ~2-4 s on the tiny model: still running


def worker_status(stack) -> worker_pb2.StatusResponse:
    with grpc.insecure_channel(stack.worker.address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=5)


def wait_until(predicate, timeout_s: float, step_s: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def wait_running(stack) -> worker_pb2.StatusResponse:
    status = wait_until(lambda: (s := worker_status(stack)).num_running and s, 20)
    assert status and status.num_running == 1, "the long request never started on the worker"
    return status


def assert_freed(stack, idle: worker_pb2.StatusResponse, within_s: float) -> float:
    """The worker is back to `idle` (no sequence, every KV block free) within `within_s`; returns how long it took."""
    start = time.monotonic()
    status = wait_until(lambda: (s := worker_status(stack)).num_running == 0 and s.num_waiting == 0
                        and s.free_kv_blocks == idle.free_kv_blocks and s, within_s, step_s=0.005)
    assert status, f"worker still busy: {worker_status(stack)}"
    return time.monotonic() - start


def assert_slot_unpinned(stack, model: str) -> None:
    """A pinned delta cannot be evicted: EvictDelta succeeding proves the request's pin is gone."""
    with grpc.insecure_channel(stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        evicted = stub.EvictDelta(worker_pb2.EvictDeltaRequest(model=model, tier=common_pb2.RESIDENCY_TIER_DEVICE),
                                  timeout=5)
    assert evicted.evicted, f"{model} is still pinned on the worker"


@pytest.fixture
def idle(shared_stack):
    with Client(shared_stack.scheduler.address, timeout_s=60) as client:  # ft-a warm on the device
        client.generate("ft-a", "warm", max_tokens=1)
    status = wait_until(lambda: (s := worker_status(shared_stack)).num_running == 0 and s, 10)
    assert status.free_kv_blocks == status.total_kv_blocks
    return status


def test_client_deadline_aborts_the_work_on_the_worker(shared_stack, idle):
    with Client(shared_stack.scheduler.address) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.generate("ft-a", "deadline", timeout_s=0.6, **LONG)
        waited = time.monotonic() - start
    took = assert_freed(shared_stack, idle, within_s=1.0)
    print(f"\ndeadline: client gave up after {waited:.2f} s, worker freed within {took * 1e3:.0f} ms after that")
    assert waited < 2.0
    assert_slot_unpinned(shared_stack, "ft-a")
    log = shared_stack.worker.log_tail(200_000)
    assert "request_aborted" in log


def test_client_cancel_mid_stream_frees_kv_and_slot(shared_stack, idle):
    with grpc.insecure_channel(shared_stack.scheduler.address) as channel:
        request = scheduler_pb2.GenerateRequest(model="ft-a", prompt="cancel me",
                                                sampling=common_pb2.SamplingParams(**LONG), request_id="cancel-1")
        call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(request, timeout=60)
        first = next(call)  # streaming: the worker holds KV blocks now
        assert first.token_ids
        busy = wait_running(shared_stack)
        assert busy.free_kv_blocks < idle.free_kv_blocks
        call.cancel()
        took = assert_freed(shared_stack, idle, within_s=1.0)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    print(f"\ncancel: worker freed {idle.free_kv_blocks - busy.free_kv_blocks} KV blocks within {took * 1e3:.0f} ms")
    assert_slot_unpinned(shared_stack, "ft-a")
    assert shared_stack.r.hget("dz:request:cancel-1", "state") == "cancelled"


def test_http_client_hanging_up_cancels_the_generation(shared_stack, idle):
    host, port = shared_stack.gateway.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "ft-a", "prompt": "hang up", "stream": True, **LONG}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    wait_running(shared_stack)
    conn.sock.close()  # the user closes the tab
    conn.close()
    took = assert_freed(shared_stack, idle, within_s=2.0)
    print(f"\nHTTP hang-up: worker freed within {took * 1e3:.0f} ms")
    assert_slot_unpinned(shared_stack, "ft-a")


def test_deadline_while_waiting_in_the_worker_queue(shared_stack, idle):
    """A request that times out before it ever runs leaves nothing behind either (waiting, then dropped)."""
    errors = []

    def long_one(i):
        with Client(shared_stack.scheduler.address) as client:
            try:
                client.generate("ft-b", f"queued {i}", timeout_s=0.8, **LONG)
            except DeadlineExceededError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=long_one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 6
    assert_freed(shared_stack, idle, within_s=2.0)
    with Client(shared_stack.scheduler.address, timeout_s=30) as client:  # still serving
        assert client.generate("ft-b", "after", max_tokens=2).token_ids
