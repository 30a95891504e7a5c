"""SDK pieces without a server: request building, error mapping, artifact scanning, light import."""

import hashlib
import subprocess
import sys

import grpc
import pytest

from deltazip.client import DeltaZipError, InvalidArgumentError, NotFoundError, UnavailableError
from deltazip.client.errors import error_from_rpc
from deltazip.client.push import push_requests, scan_artifact
from deltazip.client.requests import generate_request, sampling_params


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_sampling_keywords_map_to_proto():
    p = sampling_params(max_tokens=5, temperature=0.0, stop="###", seed=None)
    assert p.max_tokens == 5 and p.HasField("temperature") and p.temperature == 0.0
    assert list(p.stop) == ["###"] and not p.HasField("seed") and not p.HasField("top_p")
    with pytest.raises(TypeError, match="unknown sampling argument"):
        sampling_params(temprature=1.0)


def test_generate_request_takes_prompt_or_messages():
    assert generate_request("m", "hi", None, None, {}).prompt == "hi"
    r = generate_request("m", None, [{"role": "user", "content": "x"}], "rid", {})
    assert r.WhichOneof("input") == "messages" and r.messages.messages[0].content == "x" and r.request_id == "rid"
    with pytest.raises(TypeError):
        generate_request("m", "hi", [{"role": "user", "content": "x"}], None, {})


def test_errors_keep_code_and_message():
    err = error_from_rpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'x' is not registered"))
    assert isinstance(err, NotFoundError) and isinstance(err, DeltaZipError)
    assert err.code == grpc.StatusCode.NOT_FOUND and err.message == "model 'x' is not registered"
    assert isinstance(error_from_rpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad")), InvalidArgumentError)
    assert isinstance(error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")), UnavailableError)
    assert type(error_from_rpc(FakeRpcError(grpc.StatusCode.DATA_LOSS, "x"))) is DeltaZipError


def test_scan_artifact_orders_manifest_first_and_skips_hidden(tmp_path):
    (tmp_path / "b.safetensors").write_bytes(b"bb")
    (tmp_path / "a.safetensors").write_bytes(b"a" * 10)
    (tmp_path / ".DS_Store").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        scan_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    files = scan_artifact(tmp_path)
    assert [f.path for f in files] == ["manifest.json", "a.safetensors", "b.safetensors"]
    assert files[1].sha256 == hashlib.sha256(b"a" * 10).hexdigest() and files[1].size == 10


def test_push_requests_header_then_ordered_chunks(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "big.bin").write_bytes(b"z" * (2 * 1024 * 1024 + 3))
    seen: list[int] = []
    requests = list(push_requests("n", scan_artifact(tmp_path), on_bytes=seen.append))
    assert requests[0].header.name == "n" and [f.path for f in requests[0].header.files] == ["manifest.json", "big.bin"]
    chunks = [r.chunk for r in requests[1:]]
    assert [(c.path, c.offset) for c in chunks] == [("manifest.json", 0), ("big.bin", 0), ("big.bin", 1 << 20), ("big.bin", 2 << 20)]
    assert sum(seen) == 2 + 2 * 1024 * 1024 + 3


def test_import_deltazip_is_light():
    code = ("import sys, deltazip; assert 'grpc' not in sys.modules; from deltazip import Client, AsyncClient; "
            "assert 'torch' not in sys.modules, 'SDK imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
