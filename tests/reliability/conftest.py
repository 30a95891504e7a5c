"""Fixtures for the reliability tests: tiny models (one session-wide set) and a shared serving stack.

The shared stack (redis-server with AOF + 1 delta store + 1 worker + 1 scheduler + the HTTP gateway) serves
the tests that do not break anything (bad input, deadlines, the short soak); tests that kill processes start
their own.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from deltazip.client import Client
from deltazip.model.loader import model_from_state_dict
from deltazip.model.synthetic import tiny_config
from deltazip.stack import Launcher, Proc, start_redis, stop
from tests.integration.gateway_proc import start_gateway
from tests.integration.tiny_models import merged_reference, write_finetune, write_tiny_base

# 512 positions: long enough that a generation runs for a second or more (deadline / cancel tests).
CONFIG = tiny_config(max_position_embeddings=512)
WORKER_FLAGS = ("--device", "cpu", "--num-device-slots", "2", "--max-deltas-per-batch", "2", "--num-kv-blocks", "128",
                "--kv-block-size", "8", "--heartbeat-s", "0.3", "--heartbeat-ttl-s", "1.5", "--model-sync-s", "0.5")


@dataclass
class Models:
    base_dir: Path
    artifacts: dict[str, Path]  # name -> dense delta artifact folder
    merged: dict  # name -> merged reference model (base + delta), "tiny-base" included


@pytest.fixture(scope="session")
def rmodels(tmp_path_factory) -> Models:
    """A tiny base (byte tokenizer, 512 positions), two dense delta artifacts and their merged references."""
    from deltazip.artifact import write_dense_delta

    root = tmp_path_factory.mktemp("rmodels")
    base_dir, base_state = write_tiny_base(root, CONFIG)
    artifacts, merged = {}, {"tiny-base": model_from_state_dict(CONFIG, base_state)}
    for i, name in enumerate(("ft-a", "ft-b")):
        out = root / f"{name}-delta"
        write_dense_delta(base_dir, write_finetune(base_state, root / f"{name}-hf", seed=10 + i, config=CONFIG), out)
        artifacts[name] = out
        merged[name] = merged_reference(base_dir, out, CONFIG)
    return Models(base_dir, artifacts, merged)


@dataclass
class Stack:
    launcher: Launcher
    redis: Proc
    store: Proc
    worker: Proc
    scheduler: Proc
    gateway: Proc
    models: Models
    root: Path

    @property
    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.launcher.redis_url, decode_responses=True)


def push_all(store_address: str, models: Models, names=("ft-a", "ft-b")) -> None:
    with Client("127.0.0.1:1", store=store_address) as client:
        for name in names:
            client.push(models.artifacts[name], name, progress=False)


@pytest.fixture(scope="session")
def shared_stack(rmodels, tmp_path_factory):
    """One long-lived stack for the tests that leave it as they found it."""
    root = tmp_path_factory.mktemp("shared-stack")
    redis_proc = start_redis(root / "redis", appendonly=True)
    launcher = Launcher(f"redis://{redis_proc.address}/0", root / "logs")
    gateway = None
    try:
        store = launcher.start("delta_store", "--root", str(root / "store"), "--heartbeat-s", "0.3",
                               "--heartbeat-ttl-s", "1.5")
        push_all(store.address, rmodels)
        worker = launcher.start("worker", "--base-dir", str(rmodels.base_dir), *WORKER_FLAGS, "--worker-id", "w0",
                                "--disk-cache-dir", str(root / "cache"))
        scheduler = launcher.start("scheduler", "--worker-check-s", "0.3")
        gateway = start_gateway(scheduler.address, root / "logs")
        yield Stack(launcher, redis_proc, store, worker, scheduler, gateway, rmodels, root)
    finally:
        if gateway is not None:
            stop(gateway)
        launcher.stop_all()
        stop(redis_proc)
        shutil.rmtree(root / "cache", ignore_errors=True)
