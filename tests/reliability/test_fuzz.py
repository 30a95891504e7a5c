"""Fuzzing the servicers (over gRPC, against the real processes) and the artifact manifest parsers, time-bounded.

Promise: whatever arrives, a service answers OK or a precise status, never UNKNOWN / INTERNAL and never a
stack trace in the message; the manifest parsers raise only their documented errors. The whole module runs in
about 20 s (hypothesis example counts are fixed; atheris, when installed, runs for a fixed number of inputs).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltazip.artifact.errors import ArtifactError
from deltazip.artifact.manifest import read_manifest
from deltazip.rpc.errors import ServiceError
from deltazip.stack import REPO_ROOT
from deltazip.v1 import (common_pb2, delta_store_pb2, delta_store_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc,
                         worker_pb2, worker_pb2_grpc)
from services.delta_store.manifest import check_listed_files, read_summary

pytestmark = pytest.mark.timeout(120)

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
PROTECTED = {"ft-a", "ft-b"}  # the shared stack's models: DeleteDelta must not remove them

names = st.one_of(st.sampled_from(["ft-a", "ft-b", "tiny-base", "", "../x", ".partial", "a/b", "x" * 200]),
                  st.text(max_size=40))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
sampling = st.builds(
    lambda mt, t, p, k, seed, stop, eos, mn: common_pb2.SamplingParams(
        max_tokens=mt, temperature=t, top_p=p, top_k=k, seed=seed, stop=stop, ignore_eos=eos, min_tokens=mn),
    st.sampled_from([0, 1, 2, 3, 32769, 2**32 - 1]), floats, floats, st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1), st.lists(st.text(max_size=300), max_size=18), st.booleans(), st.integers(0, 2**32 - 1))


def check(call) -> None:
    """Run one RPC; any status but UNKNOWN/INTERNAL is fine, and messages never carry a traceback."""
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() not in NEVER, (exc.code(), exc.details())
        details = exc.details() or ""
        assert "Traceback" not in details and 'File "' not in details, details


@pytest.fixture(scope="module")
def stubs(shared_stack):
    channels = [grpc.insecure_channel(p.address) for p in (shared_stack.scheduler, shared_stack.worker,
                                                            shared_stack.store)]
    yield (scheduler_pb2_grpc.SchedulerStub(channels[0]), worker_pb2_grpc.WorkerStub(channels[1]),
           delta_store_pb2_grpc.DeltaStoreStub(channels[2]), channels)
    for channel in channels:
        channel.close()


def test_fuzz_scheduler_generate(stubs):
    scheduler = stubs[0]

    @FUZZ
    @given(model=names, prompt=st.text(max_size=64), params=sampling, request_id=st.text(max_size=140))
    def one(model, prompt, params, request_id):
        request = scheduler_pb2.GenerateRequest(model=model, prompt=prompt, sampling=params, request_id=request_id)
        check(lambda: list(scheduler.Generate(request, timeout=20)))

    one()


def test_fuzz_scheduler_unary_and_worker(stubs):
    scheduler, worker = stubs[0], stubs[1]

    @FUZZ
    @given(name=names, tier=st.integers(0, 2**31 - 1), num=st.integers(0, 2**32 - 1), prompt=st.text(max_size=32),
           params=sampling)
    def one(name, tier, num, prompt, params):
        check(lambda: scheduler.GetModel(scheduler_pb2.GetModelRequest(name=name), timeout=10))
        check(lambda: scheduler.Prefetch(scheduler_pb2.PrefetchRequest(model=name, tier=tier, num_workers=num),
                                         timeout=10))
        check(lambda: worker.EvictDelta(worker_pb2.EvictDeltaRequest(model=name, tier=tier), timeout=10))
        check(lambda: worker.LoadDelta(worker_pb2.LoadDeltaRequest(model=name, tier=tier), timeout=10))
        request = worker_pb2.WorkerGenerateRequest(model=name, prompt=prompt, sampling=params, attempt=num)
        check(lambda: list(worker.Generate(request, timeout=20)))

    one()


def test_fuzz_store(stubs):
    store = stubs[2]

    @FUZZ
    @given(name=names, path=st.text(max_size=40), offset=st.integers(0, 2**63 - 1), size=st.integers(0, 2**63 - 1),
           chunk=st.integers(0, 2**32 - 1), data=st.binary(max_size=64), sha=st.text(max_size=70))
    def one(name, path, offset, size, chunk, data, sha):
        check(lambda: store.StatDelta(delta_store_pb2.StatDeltaRequest(name=name), timeout=10))
        fetch = delta_store_pb2.FetchDeltaRequest(name=name, start_path=path, start_offset=offset, chunk_bytes=chunk)
        check(lambda: list(store.FetchDelta(fetch, timeout=10)))
        if name not in PROTECTED:
            check(lambda: store.DeleteDelta(delta_store_pb2.DeleteDeltaRequest(name=name), timeout=10))
        header = delta_store_pb2.PushHeader(name=name or "fuzz", files=[
            delta_store_pb2.FileEntry(path="manifest.json", size=min(size, 1 << 20), sha256=sha),
            delta_store_pb2.FileEntry(path=path, size=size, sha256=sha)])
        pushes = [delta_store_pb2.PushDeltaRequest(header=header),
                  delta_store_pb2.PushDeltaRequest(chunk=delta_store_pb2.FileChunk(path=path, offset=offset, data=data))]
        check(lambda: store.PushDelta(iter(pushes), timeout=10))

    one()


METHODS = ["/deltazip.v1.Scheduler/Generate", "/deltazip.v1.Scheduler/GetModel", "/deltazip.v1.Scheduler/Prefetch",
           "/deltazip.v1.Worker/Generate", "/deltazip.v1.Worker/LoadDelta", "/deltazip.v1.DeltaStore/StatDelta",
           "/deltazip.v1.DeltaStore/FetchDelta", "/deltazip.v1.DeltaStore/PushDelta"]


def test_fuzz_raw_bytes_to_every_method(stubs, shared_stack):
    channels = dict(zip(("Scheduler", "Worker", "DeltaStore"), stubs[3]))

    @FUZZ
    @given(method=st.sampled_from(METHODS), raw=st.binary(max_size=128))
    def one(method, raw):
        channel = channels[method.split("/")[1].split(".")[-1]]
        if method.endswith(("/Generate", "/FetchDelta")):
            check(lambda: list(channel.unary_stream(method)(raw, timeout=20)))
        elif method.endswith("/PushDelta"):
            check(lambda: channel.stream_unary(method)(iter([raw, raw]), timeout=10))
        else:
            check(lambda: channel.unary_unary(method)(raw, timeout=10))

    one()
    assert shared_stack.r.exists("dz:model:ft-a") and shared_stack.r.exists("dz:model:ft-b")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
manifests = st.one_of(
    json_values,
    st.fixed_dictionaries({"format": st.just("deltazip-delta")}, optional={
        "format_version": json_values, "base_identity": json_values, "compression": json_values,
        "tensors": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "shards": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        "files": json_values, "base": json_values, "ft_bytes_fp16": json_values}))


def test_fuzz_manifest_parsers():
    """The store's summary/listing checks refuse with INVALID_ARGUMENT; the artifact reader with ArtifactError."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @FUZZ
        @given(data=manifests, raw=st.binary(max_size=64))
        def one(data, raw):
            for text in (json.dumps(data).encode(), raw):
                (folder / "manifest.json").write_bytes(text)
                for parse in (read_summary, lambda p: check_listed_files(p, {})):
                    try:
                        parse(folder / "manifest.json")
                    except ServiceError as exc:
                        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
                try:
                    read_manifest(folder)
                except ArtifactError:
                    pass

        one()


ATHERIS_TARGET = """
import sys, tempfile, pathlib, atheris
from deltazip.artifact.errors import ArtifactError
from deltazip.rpc.errors import ServiceError
with atheris.instrument_imports(include=["deltazip.artifact.manifest", "services.delta_store.manifest"]):
    from deltazip.artifact.manifest import read_manifest
    from services.delta_store.manifest import check_listed_files, read_summary
folder = pathlib.Path(tempfile.mkdtemp())
def one(data: bytes):
    (folder / "manifest.json").write_bytes(data)
    for parse in (read_summary, lambda p: check_listed_files(p, {})):
        try:
            parse(folder / "manifest.json")
        except ServiceError:
            pass
    try:
        read_manifest(folder)
    except ArtifactError:
        pass
atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def test_atheris_manifest_parsers(tmp_path):
    """Coverage-guided fuzzing of the same parsers for a fixed number of inputs (skipped without atheris)."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed.json").write_text(json.dumps({"format": "deltazip-delta", "format_version": 1, "base_identity": "x",
                                                  "compression": {}, "tensors": {}, "shards": {"a": {"size": 1}}}))
    target = tmp_path / "target.py"
    target.write_text(ATHERIS_TARGET)
    done = subprocess.run([sys.executable, str(target), "-runs=2000", "-max_total_time=6", str(corpus)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]


json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=20)
openai_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"model": st.sampled_from(["ft-a", "tiny-base", "nope", "../x", ""]) | json_scalars}, optional={
        "prompt": json_values, "messages": st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                                                     json_values, max_size=3), max_size=3) | json_values,
        "max_tokens": st.sampled_from([0, 1, 2, -1, 10**12]) | json_scalars, "temperature": json_scalars,
        "top_p": json_scalars, "top_k": json_scalars, "seed": json_scalars, "stop": json_values, "n": json_scalars,
        "stream": json_scalars, "stream_options": json_values, "min_tokens": json_scalars, "ignore_eos": json_scalars,
        "logprobs": json_scalars, "best_of": json_scalars, "max_completion_tokens": json_scalars}))


def test_fuzz_gateway_http(shared_stack):
    """Random JSON bodies to both generation routes: a 2xx or a 4xx in OpenAI's error shape, never a 5xx."""
    import http.client

    host, port = shared_stack.gateway.address.split(":")

    @FUZZ
    @given(body=openai_bodies, chat=st.booleans())
    def one(body, chat):
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
            body["max_tokens"] = 4  # keep valid requests short
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions" if chat else "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            reply = conn.getresponse()
            raw = reply.read()
        finally:
            conn.close()
        assert reply.status < 500, (reply.status, raw[:500], body)
        if reply.status >= 400:
            error = json.loads(raw)["error"]
            assert error["message"] and "Traceback" not in error["message"]

    one()
