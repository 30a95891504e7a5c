"""Pytest fixtures over deltazip.stack: real redis-server and services on free loopback ports.

Import the fixtures into a test module (`from tests.integration.procs import redis_url, launcher`);
every process they start is stopped when the test ends, pass or fail.
"""

from pathlib import Path

import pytest

from deltazip.stack import REDIS_SERVER, REPO_ROOT, Launcher, Proc, start_redis, start_service, stop  # noqa: F401

@pytest.fixture
def redis_proc(tmp_path: Path):
    """A private redis-server for this test."""
    proc = start_redis(tmp_path / "redis")
    try:
        yield proc
    finally:
        stop(proc)


@pytest.fixture
def redis_url(redis_proc: Proc) -> str:
    """URL of this test's redis-server."""
    return f"redis://{redis_proc.address}/0"


@pytest.fixture
def launcher(redis_url: str, tmp_path: Path):
    """Start services with `launcher.start("delta_store", "--root", ...)`; all are stopped afterwards."""
    launcher = Launcher(redis_url, tmp_path / "logs")
    try:
        yield launcher
    finally:
        launcher.stop_all()
