"""A stack with TLS on every gRPC hop and bearer tokens: redis + delta store + worker + scheduler + gateway.

Promises checked: the right token works end to end over TLS (SDK → scheduler → worker → store, and HTTP →
gateway → scheduler); no or an unknown token is UNAUTHENTICATED; another tenant's model is NOT_FOUND with the
same message as a missing one (names never leak); a read-only token cannot push (PERMISSION_DENIED); a
plaintext client or one trusting another CA cannot talk to a TLS server (UNAVAILABLE); mutual TLS refuses
clients without a certificate; store paths cannot escape its root; no token ever appears in a service log.
"""

import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from deltazip.client import (AlreadyExistsError, Client, InvalidArgumentError, NotFoundError, PermissionDeniedError,
                             UnauthenticatedError, UnavailableError)
from deltazip.rpc.channels import sync_channel
from deltazip.security.certs import generate
from deltazip.security.tls import TlsSettings
from deltazip.security.tokens import add_token, parse_scopes
from deltazip.stack import REPO_ROOT, Launcher, start_redis, start_service, stop
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc
from tests.integration.gateway_proc import start_gateway
from tests.integration.tiny_models import write_finetune, write_tiny_base

pytestmark = pytest.mark.timeout(180)

GREEDY = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
TENANTS = {  # name → (tenant, scopes)
    "acme": ("acme", "read,write"),
    "acme-reader": ("acme", "read"),
    "globex": ("globex", "read,write"),
    "ops": ("ops", "admin"),
    "worker": ("cluster", "admin"),
}


class SecureStack:
    def __init__(self, root: Path):
        self.root = root
        self.certs = generate(root / "certs")
        tokens_file = root / "tokens.json"
        self.tokens = {name: add_token(tokens_file, tenant, parse_scopes(scopes), name)
                       for name, (tenant, scopes) in TENANTS.items()}
        (root / "worker.token").write_text(self.tokens["worker"] + "\n")
        self.tls = TlsSettings(ca=str(self.certs.ca))
        server_tls = ["--tls-cert", str(self.certs.server_cert), "--tls-key", str(self.certs.server_key),
                      "--tls-ca", str(self.certs.ca)]
        self.server_tls, self.tokens_file = server_tls, tokens_file
        self.redis = start_redis(root / "redis")
        self.launcher = Launcher(f"redis://{self.redis.address}/0", root / "logs",
                                 tls=TlsSettings(ca=str(self.certs.ca)))
        self.gateway = None
        try:
            self._start(root)
        except BaseException:
            self.close()
            raise

    def _start(self, root: Path) -> None:
        base_dir, delta = tiny_base_and_delta(root / "models")
        auth = ["--auth-tokens", str(self.tokens_file), "--log-level", "debug"]
        self.store = self.launcher.start("delta_store", "--root", str(root / "store"), *self.server_tls, *auth)
        self.delta = delta
        self.client("acme").push(delta, "acme-ft", progress=False)
        self.client("globex").push(delta, "globex-ft", progress=False)
        self.client("ops").push(delta, "shared-ft", progress=False, shared=True)
        self.launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2",
                            "--max-deltas-per-batch", "2", "--num-kv-blocks", "32", "--kv-block-size", "8",
                            "--heartbeat-s", "0.5", "--disk-cache-dir", str(root / "cache"), "--log-level", "debug",
                            "--store-token-file", str(root / "worker.token"), *self.server_tls)
        self.scheduler = self.launcher.start("scheduler", *self.server_tls, *auth)
        self.gateway = start_gateway(self.scheduler.address, root / "logs", "--tls-ca", str(self.certs.ca),
                                     "--log-level", "debug")

    def client(self, who: str | None, **kwargs) -> Client:
        token = self.tokens[who] if who in self.tokens else (who or "")
        kwargs.setdefault("tls", self.tls)
        return Client(self.scheduler.address if hasattr(self, "scheduler") else "127.0.0.1:1", store=self.store.address,
                      timeout_s=60, token=token, **kwargs)

    def logs(self) -> str:
        procs = [*self.launcher.procs, *([self.gateway] if self.gateway else [])]
        return "\n".join(p.log_path.read_text(errors="replace") for p in procs)

    def close(self) -> None:
        if self.gateway is not None:
            stop(self.gateway)
        self.launcher.stop_all()
        stop(self.redis)


def tiny_base_and_delta(root: Path) -> tuple[Path, Path]:
    """The tiny base (byte tokenizer) and one dense delta of a fine-tune of it."""
    from deltazip.artifact import write_dense_delta

    base_dir, base_state = write_tiny_base(root)
    write_dense_delta(base_dir, write_finetune(base_state, root / "ft-hf", seed=10), root / "ft-delta")
    return base_dir, root / "ft-delta"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = SecureStack(tmp_path_factory.mktemp("secure"))
    try:
        yield s
    finally:
        s.close()


def test_right_token_generates_end_to_end_over_tls(stack):
    with stack.client("acme") as client:
        own = client.generate("acme-ft", "hello", **GREEDY)
        shared = client.generate("shared-ft", "hello", **GREEDY)
        base = client.generate("tiny-base", "hello", **GREEDY)
    assert len(own.token_ids) == len(shared.token_ids) == len(base.token_ids) == 4
    assert own.token_ids == shared.token_ids  # the same artifact pushed under two names
    assert own.worker_id


def test_each_tenant_lists_only_its_own_and_shared_models(stack):
    seen = {}
    for who in ("acme", "globex", "ops"):
        with stack.client(who) as client:
            seen[who] = {m.name for m in client.models()}
            stored = {m.name for m in client.stored_models()}
        assert stored == seen[who] - {"tiny-base"}, who
    assert seen["acme"] == {"tiny-base", "acme-ft", "shared-ft"}
    assert seen["globex"] == {"tiny-base", "globex-ft", "shared-ft"}
    assert seen["ops"] == {"tiny-base", "acme-ft", "globex-ft", "shared-ft"}
    with stack.client("ops") as client:
        owners = {m.name: (m.tenant, m.shared) for m in client.models() if not m.is_base}
    assert owners == {"acme-ft": ("acme", False), "globex-ft": ("globex", False), "shared-ft": ("ops", True)}


def test_missing_or_unknown_token_is_unauthenticated(stack):
    for token in ("", "dz_not-a-real-token"):
        with stack.client(token) as client:
            with pytest.raises(UnauthenticatedError, match="token") as err:
                client.generate("acme-ft", "hello", **GREEDY)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(UnauthenticatedError):
                client.models()
            with pytest.raises(UnauthenticatedError):  # the store checks tokens too
                client.push(stack.delta, "sneaky", progress=False)


def test_other_tenants_model_is_not_found_like_a_missing_one(stack):
    with stack.client("globex") as client:
        with pytest.raises(NotFoundError) as hidden:
            client.generate("acme-ft", "hello", **GREEDY)
        with pytest.raises(NotFoundError) as missing:
            client.generate("no-such-ft", "hello", **GREEDY)
        assert hidden.value.message.replace("acme-ft", "X") == missing.value.message.replace("no-such-ft", "X")
        with pytest.raises(NotFoundError):
            client.get_model("acme-ft")
        with pytest.raises(NotFoundError):
            client.stat("acme-ft")
        with pytest.raises(NotFoundError):
            client.fetch("acme-ft", stack.root / "stolen")
        with pytest.raises(NotFoundError):
            client.delete("acme-ft")
        with pytest.raises(PermissionDeniedError, match="owner"):  # visible, but not globex's to delete
            client.delete("shared-ft")
        with pytest.raises(AlreadyExistsError, match="taken"):  # names are global; the owner stays hidden
            client.push(stack.delta, "acme-ft", progress=False, overwrite=True)
    with stack.client("acme") as client:
        assert client.get_model("acme-ft").tenant == "acme"


def test_scopes_are_enforced(stack):
    with stack.client("acme-reader") as client:
        assert client.generate("acme-ft", "hi", **GREEDY).token_ids  # read is enough to generate
        with pytest.raises(PermissionDeniedError, match="'write' scope"):
            client.push(stack.delta, "reader-ft", progress=False)
        with pytest.raises(PermissionDeniedError, match="'write' scope"):
            client.delete("acme-ft")
    with stack.client("acme") as client:
        with pytest.raises(PermissionDeniedError, match="admin"):
            client.push(stack.delta, "acme-shared", progress=False, shared=True)
        client.push(stack.delta, "acme-tmp", progress=False)
        assert client.delete("acme-tmp")


def test_plaintext_or_untrusted_clients_cannot_reach_tls_servers(stack, tmp_path):
    other_ca = generate(tmp_path / "other-certs").ca
    for tls in (False, TlsSettings(ca=str(other_ca))):
        with stack.client("acme", tls=tls) as client:
            with pytest.raises(UnavailableError):
                client.models()
            with pytest.raises(UnavailableError):
                client.stat("acme-ft")


def test_mutual_tls_refuses_clients_without_a_certificate(stack):
    certs = stack.certs
    with_cert = TlsSettings(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key))
    args = ["--redis-url", stack.launcher.redis_url, "--root", str(stack.root / "store-mtls"), *stack.server_tls,
            "--tls-require-client-cert", "1", "--auth-tokens", str(stack.tokens_file)]
    mtls_store = start_service("delta_store", args, stack.root / "logs", tls=with_cert)
    try:
        with Client(store=mtls_store.address, token=stack.tokens["acme"], tls=stack.tls, timeout_s=30) as client:
            with pytest.raises(UnavailableError):
                client.stored_models()
        with Client(store=mtls_store.address, token=stack.tokens["acme"], tls=with_cert, timeout_s=30) as client:
            assert client.stored_models() == []
        # the compose health probe: the service's own DELTAZIP_TLS_* env, client certificate included
        probe_env = {"DELTAZIP_TLS_CA": str(certs.ca), "DELTAZIP_TLS_CERT": str(certs.server_cert),
                     "DELTAZIP_TLS_KEY": str(certs.server_key)}
        assert healthcheck(mtls_store.address, probe_env) == 0
        assert healthcheck(mtls_store.address, {"DELTAZIP_TLS_CA": str(certs.ca)}) == 1
        assert healthcheck(mtls_store.address, {}) == 1
    finally:
        stop(mtls_store)


def healthcheck(address: str, tls_env: dict[str, str]) -> int:
    """Exit code of `python -m deltazip.rpc.healthcheck` with exactly these DELTAZIP_TLS_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAZIP_TLS")}
    done = subprocess.run([sys.executable, "-m", "deltazip.rpc.healthcheck", address], capture_output=True, text=True,
                          env={**env, **tls_env, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT, timeout=60)
    return done.returncode


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "a\x00b", "..", "x/y"])
def test_store_refuses_names_that_escape_its_root(stack, name):
    with stack.client("ops") as client:
        with pytest.raises(InvalidArgumentError, match="invalid model name"):
            client.stat(name)
        with pytest.raises(InvalidArgumentError, match="invalid model name"):
            client.delete(name)
        with pytest.raises(InvalidArgumentError, match="invalid model name"):
            client.push(stack.delta, name, progress=False)
    assert not (stack.root / "x").exists() and not (stack.root / "b").exists()


@pytest.mark.parametrize("path", ["../escape.safetensors", "/abs.safetensors", "a\\b", "sub/../../up", "nul\x00"])
def test_store_refuses_file_paths_that_escape_the_artifact(stack, path):
    stub = delta_store_pb2_grpc.DeltaStoreStub(sync_channel(stack.store.address, stack.tls))
    header = delta_store_pb2.PushHeader(name="path-probe")
    header.files.add(path="manifest.json", size=2, sha256="0" * 64)
    header.files.add(path=path, size=1, sha256="0" * 64)
    requests = iter([delta_store_pb2.PushDeltaRequest(header=header)])
    with pytest.raises(grpc.RpcError) as err:
        stub.PushDelta(requests, timeout=30, metadata=(("authorization", f"Bearer {stack.tokens['ops']}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid file path" in err.value.details()
    assert not list(stack.root.glob("store/*escape*")) and not (stack.root / "up").exists()


def test_cli_takes_a_token_file_and_the_ca(stack, tmp_path, monkeypatch, capsys):
    from deltazip.cli import main

    for var in ("DELTAZIP_TOKEN", "DELTAZIP_TOKEN_FILE", "DELTAZIP_TLS_CA", "DELTAZIP_TLS_CERT", "DELTAZIP_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    token_file = tmp_path / "acme.token"
    token_file.write_text(stack.tokens["acme"] + "\n")
    tls = ["--tls-ca", str(stack.certs.ca)]
    assert main(["push", str(stack.delta), "--name", "acme-cli", "--store", stack.store.address, "--quiet",
                 "--token-file", str(token_file), *tls]) == 0
    assert main(["models", "--scheduler", stack.scheduler.address, "--token-file", str(token_file), *tls]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in listing.splitlines() if not line.startswith(("pushed", "NAME"))}
    assert rows == {"tiny-base": "shared", "acme-cli": "acme", "acme-ft": "acme", "shared-ft": "(shared)"}
    monkeypatch.setenv("DELTAZIP_TLS_CA", str(stack.certs.ca))  # the same through the environment
    monkeypatch.setenv("DELTAZIP_TOKEN_FILE", str(token_file))
    assert main(["delete", "acme-cli", "--store", stack.store.address]) == 0
    assert capsys.readouterr().out == "deleted acme-cli\n"
    assert main(["models", "--scheduler", stack.scheduler.address]) == 0
    assert "acme-cli" not in capsys.readouterr().out
    monkeypatch.delenv("DELTAZIP_TOKEN_FILE")
    assert main(["models", "--scheduler", stack.scheduler.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def _http(stack, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{stack.gateway.address}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_gateway_forwards_the_http_bearer_token(stack):
    completion = {"model": "acme-ft", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    status, body = _http(stack, "POST", "/v1/completions", stack.tokens["acme"], completion)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    status, body = _http(stack, "POST", "/v1/completions", None, completion)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _http(stack, "POST", "/v1/completions", stack.tokens["globex"], completion)
    assert status == 404
    status, body = _http(stack, "GET", "/v1/models", stack.tokens["globex"])
    assert status == 200 and {m["id"] for m in body["data"]} == {"tiny-base", "globex-ft", "shared-ft"}


def test_gateway_can_serve_https(stack):
    certs = stack.certs
    gateway = start_gateway(stack.scheduler.address, stack.root / "logs", "--tls-ca", str(certs.ca),
                            "--https-cert", str(certs.server_cert), "--https-key", str(certs.server_key),
                            https_ca=str(certs.ca))
    try:
        request = urllib.request.Request(f"https://localhost:{gateway.address.rsplit(':', 1)[1]}/v1/models",
                                         headers={"Authorization": f"Bearer {stack.tokens['acme']}"})
        with urllib.request.urlopen(request, timeout=60, context=ssl.create_default_context(cafile=str(certs.ca))) as reply:
            assert {m["id"] for m in json.loads(reply.read())["data"]} == {"tiny-base", "acme-ft", "shared-ft"}
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the HTTPS port gets no answer
            urllib.request.urlopen(f"http://{gateway.address}/health", timeout=10)
    finally:
        stop(gateway)


def test_no_token_appears_in_any_service_log(stack):
    bad = "dz_leaked-if-you-can-read-this"
    with stack.client(bad) as client:  # a rejected token is the likeliest to be echoed into a log line
        with pytest.raises(UnauthenticatedError):
            client.models()
        with pytest.raises(UnauthenticatedError):
            client.stored_models()
    _http(stack, "GET", "/v1/models", bad)
    with stack.client("acme") as client:
        client.generate("acme-ft", "hi", **GREEDY)
    logs = stack.logs()
    assert "request_finished" in logs and "push_committed" in logs  # the logs are the real, verbose ones
    for who, token in [*stack.tokens.items(), ("bad", bad)]:
        assert token not in logs, f"{who}'s token appears in a service log"
        assert token[3:20] not in logs, f"part of {who}'s token appears in a service log"
