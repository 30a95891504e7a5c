"""Bad input at the public API (scheduler gRPC, the gateway's HTTP mapping) and at the worker and store APIs.

Promise: every bad request is refused with a precise status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
DATA_LOSS ...; never UNKNOWN or INTERNAL) and a message naming what to fix; nothing bad is stored; the stack
keeps serving good requests afterwards.
"""

import http.client
import json
import time
from pathlib import Path

import grpc
import pytest

from deltazip.client import Client
from deltazip.client.errors import DeltaZipError
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def sched_error(stack, model: str, prompt: str, **sampling) -> DeltaZipError:
    with Client(stack.scheduler.address, timeout_s=30) as client:
        with pytest.raises(DeltaZipError) as err:
            client.generate(model, prompt, **sampling)
    return err.value


@pytest.mark.parametrize("model,prompt,sampling,code,needle", [
    ("no-such-model", "hi", {}, "NOT_FOUND", "deltazip push"),
    ("", "hi", {}, "INVALID_ARGUMENT", "model"),
    ("ft-a", "", {}, "INVALID_ARGUMENT", "prompt is empty"),
    ("ft-a", "x" * 600, {}, "INVALID_ARGUMENT", "context limit is 512"),
    ("ft-a", "hi", {"temperature": -0.5}, "INVALID_ARGUMENT", "temperature"),
    ("ft-a", "hi", {"temperature": float("nan")}, "INVALID_ARGUMENT", "temperature"),
    ("ft-a", "hi", {"top_p": 0.0}, "INVALID_ARGUMENT", "top_p"),
    ("ft-a", "hi", {"top_p": 1.5}, "INVALID_ARGUMENT", "top_p"),
    ("ft-a", "hi", {"max_tokens": 1 << 20}, "INVALID_ARGUMENT", "max_tokens"),
    ("ft-a", "hi", {"max_tokens": 4, "min_tokens": 5}, "INVALID_ARGUMENT", "min_tokens"),
    ("ft-a", "hi", {"stop": [""]}, "INVALID_ARGUMENT", "stop"),
    ("../x", "hi", {}, "INVALID_ARGUMENT", "not a valid model name"),
    ("ft-a/../../etc/passwd", "hi", {}, "INVALID_ARGUMENT", "not a valid model name"),
    ("/etc/passwd", "hi", {}, "INVALID_ARGUMENT", "not a valid model name"),
])
def test_scheduler_refuses_bad_requests_precisely(shared_stack, model, prompt, sampling, code, needle):
    err = sched_error(shared_stack, model, prompt, **sampling)
    assert err.code.name == code and needle in err.message, str(err)
    assert "Traceback" not in err.message


def test_oversize_messages_and_prompts(shared_stack):
    """A 1 MiB prompt is refused against the context (INVALID_ARGUMENT) without being tokenized: tokenizing it
    would hold the worker's GIL for seconds and let its heartbeat expire (every request on it would be cut);
    one over the 16 MiB message limit is RESOURCE_EXHAUSTED by gRPC itself, naming both sizes."""
    start = time.monotonic()
    for _ in range(3):
        err = sched_error(shared_stack, "ft-a", "y" * MiB)
        assert err.code.name == "INVALID_ARGUMENT" and "context limit" in err.message, str(err)
    assert time.monotonic() - start < 3.0
    assert shared_stack.r.exists("dz:worker:w0"), "the worker's heartbeat expired while it read the prompt"
    err = sched_error(shared_stack, "ft-a", "z" * (17 * MiB))
    assert err.code.name == "RESOURCE_EXHAUSTED" and "larger than max" in err.message, str(err)


def test_max_tokens_beyond_context_stops_at_the_context(shared_stack):
    """max_tokens within --max-tokens-limit but past the context: generation ends there with finish LENGTH."""
    with Client(shared_stack.scheduler.address, timeout_s=60) as client:
        done = client.generate("ft-a", "p" * 500, max_tokens=1000, temperature=0.0, ignore_eos=True)
    assert done.finish_reason == "length" and len(done.token_ids) == 512 - 500


RAW = [
    b"\xff\xff\xff\xff",  # corrupt wire format
    b"\x0a\x03\xff\xfe\xfd",  # model = 3 bytes of invalid UTF-8
    b"\x12\x02\xc3\x28",  # prompt = invalid UTF-8
    b"\x1a\x05\x08",  # truncated nested message
]


@pytest.mark.parametrize("raw", RAW)
def test_malformed_protos_are_invalid_argument(shared_stack, raw):
    with grpc.insecure_channel(shared_stack.scheduler.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(channel.unary_stream("/deltazip.v1.Scheduler/Generate")(raw, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "not a valid protobuf message" in err.value.details()
    with grpc.insecure_channel(shared_stack.store.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.stream_unary("/deltazip.v1.DeltaStore/PushDelta")(iter([raw]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_worker_api_refuses_path_like_names(shared_stack):
    """The worker turns a delta name into a disk-cache directory: names that are paths never reach the disk."""
    cache = shared_stack.root / "cache"
    before = sorted(p.name for p in cache.rglob("*"))
    with grpc.insecure_channel(shared_stack.worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for name in ("../x", "../../etc", ".partial", "a/b", "..", "x\x00y"):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(worker_pb2.WorkerGenerateRequest(model=name, prompt="hi"), timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model name" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.LoadDelta(worker_pb2.LoadDeltaRequest(model=name), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.EvictDelta(worker_pb2.EvictDeltaRequest(model="ft-a", tier=77), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tier" in err.value.details()
    assert sorted(p.name for p in cache.rglob("*")) == before


def test_store_refuses_path_like_names(shared_stack):
    """The store's own name and file-path checks (confinement is the security work's; this notes what holds)."""
    with grpc.insecure_channel(shared_stack.store.address) as channel:
        stub = delta_store_pb2_grpc.DeltaStoreStub(channel)
        for name in ("../x", "..", "a/b", "/etc"):
            with pytest.raises(grpc.RpcError) as err:
                stub.StatDelta(delta_store_pb2.StatDeltaRequest(name=name), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
            with pytest.raises(grpc.RpcError) as err:
                stub.DeleteDelta(delta_store_pb2.DeleteDeltaRequest(name=name), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())


def lying_push(name: str, artifact: Path, lie: str):
    """A push of `artifact` whose manifest.json (or header) lies about a shard's size."""
    import hashlib

    files = {p.relative_to(artifact).as_posix(): p.read_bytes() for p in artifact.rglob("*") if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    shard = sorted(manifest["shards"])[0]
    if lie == "manifest-size":
        manifest["shards"][shard]["size"] += 100
    elif lie == "manifest-sha":
        manifest["shards"][shard]["sha256"] = "0" * 64
    elif lie == "manifest-missing-shard":
        manifest["shards"]["missing.safetensors"] = {"size": 10, "sha256": "1" * 64}
    files["manifest.json"] = json.dumps(manifest).encode()
    header = delta_store_pb2.PushHeader(name=name)
    for path, data in sorted(files.items()):
        size = len(data) + (7 if lie == "header-size" and path == shard else 0)
        header.files.add(path=path, size=size, sha256=hashlib.sha256(data).hexdigest())
    yield delta_store_pb2.PushDeltaRequest(header=header)
    for path, data in sorted(files.items()):
        yield delta_store_pb2.PushDeltaRequest(chunk=delta_store_pb2.FileChunk(path=path, offset=0, data=data))


@pytest.mark.parametrize("lie", ["manifest-size", "manifest-sha", "manifest-missing-shard", "header-size"])
def test_push_with_lying_sizes_stores_nothing(shared_stack, lie):
    name = f"liar-{lie}"
    store_root = shared_stack.root / "store"
    with grpc.insecure_channel(shared_stack.store.address) as channel:
        stub = delta_store_pb2_grpc.DeltaStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushDelta(lying_push(name, shared_stack.models.artifacts["ft-a"], lie), timeout=30)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS), err.value.details()
    assert any(w in err.value.details() for w in ("size", "sha256", "bytes", "does not include"))
    assert not (store_root / name).exists()
    assert not [p for p in store_root.iterdir() if p.name.startswith(".incoming-")]
    assert not shared_stack.r.exists(f"dz:model:{name}")


def http_call(stack, method: str, path: str, body: bytes | None, headers: dict | None = None) -> tuple[int, dict]:
    host, port = stack.gateway.address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


GOOD = {"model": "ft-a", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("body,status,needle", [
    ({**GOOD, "model": "nope"}, 404, "not registered"),
    ({**GOOD, "model": "../x"}, 400, "not a valid model name"),
    ({**GOOD, "prompt": ""}, 400, "prompt"),
    ({**GOOD, "prompt": "x" * 600}, 400, "context limit"),
    ({**GOOD, "temperature": -1}, 400, "temperature"),
    ({**GOOD, "top_p": 0}, 400, "top_p"),
    ({**GOOD, "top_p": 2}, 400, "top_p"),
    ({**GOOD, "top_k": -1}, 400, "top_k"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": "many"}, 400, "max_tokens"),
    ({**GOOD, "n": 3}, 400, "n = 1"),
    ([1, 2], 400, "JSON object"),
])
def test_gateway_maps_bad_input_to_http_status(shared_stack, body, status, needle):
    got, reply = http_call(shared_stack, "POST", "/v1/completions", json.dumps(body).encode())
    assert got == status and needle in reply["error"]["message"], reply
    assert "Traceback" not in reply["error"]["message"]


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON"),
    (b'{"model": "ft-a", "prompt": "\xff\xfe"}', "UTF-8"),
])
def test_gateway_refuses_unparseable_bodies(shared_stack, raw, needle):
    got, reply = http_call(shared_stack, "POST", "/v1/completions", raw)
    assert got == 400 and needle in reply["error"]["message"], reply


def test_gateway_refuses_oversize_bodies(shared_stack):
    got, reply = http_call(shared_stack, "POST", "/v1/completions", json.dumps({**GOOD, "prompt": "x" * (3 * MiB)}).encode())
    assert got == 413 and "too large" in reply["error"]["message"], reply


def test_stack_still_serves_after_bad_input(shared_stack):
    got, reply = http_call(shared_stack, "POST", "/v1/completions", json.dumps(GOOD).encode())
    assert got == 200 and reply["usage"]["completion_tokens"] >= 1
