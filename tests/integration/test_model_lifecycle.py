"""Runtime model management on the real stack, no restarts: push → servable in seconds (SDK, CLI, gateway);
delete → in-flight requests finish, new ones get NOT_FOUND, the worker drops it from every cache;
push again under the same name, or overwrite → the new weights are served, not the old cached copy.
"""

import json
import os
import subprocess
import sys
import time

import openai
import pytest
import redis

from deltazip.client import Client
from deltazip.client.errors import NotFoundError
from deltazip.cluster import keys
from deltazip.stack import REPO_ROOT, stop
from tests.integration.gateway_proc import start_gateway
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)
from tests.integration.tiny_models import MAX_TOKENS, greedy_reference, models  # noqa: F401

pytestmark = pytest.mark.timeout(240)

LONG = 100  # tokens of the request that is in flight while its model is deleted


def cli_models(scheduler: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "deltazip", "models", "--json", "--scheduler", scheduler],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    return {m["name"] for m in json.loads(done.stdout)}


def resident_anywhere(r: redis.Redis, model: str) -> bool:
    """Whether any worker still advertises `model` in a residency tier."""
    return any(r.zscore(key, model) is not None for key in r.scan_iter(f"{keys.PREFIX}worker:*:resident:*"))


def wait_until(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_push_delete_and_repush_at_runtime(launcher, models, redis_url, tmp_path):
    base_dir, artifacts, merged = models
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    cache = tmp_path / "cache"
    launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2",
                   "--max-deltas-per-batch", "2", "--num-kv-blocks", "64", "--kv-block-size", "8",
                   "--heartbeat-s", "0.3", "--model-sync-s", "0.3", "--disk-cache-dir", str(cache))
    scheduler = launcher.start("scheduler")
    gateway = start_gateway(scheduler.address, tmp_path / "logs")
    api = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0, timeout=120)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    greedy = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    try:
        with Client(scheduler.address, store=store.address, timeout_s=120) as client:
            assert "ft-a" not in {m.name for m in client.models()}
            client.push(artifacts["ft-a"], "ft-a", progress=False)  # added while everything runs
            pushed_s = time.monotonic()
            assert client.generate("ft-a", "hello", **greedy).token_ids == greedy_reference(merged["ft-a"], list(b"hello"), MAX_TOKENS)
            assert time.monotonic() - pushed_s < 10, "a pushed model should be servable within seconds"
            assert "ft-a" in cli_models(scheduler.address)
            assert "ft-a" in {m.id for m in api.models.list().data}
            assert resident_anywhere(r, "ft-a")

            stream = client.stream("ft-a", "a", max_tokens=LONG, temperature=0.0, ignore_eos=True)
            first = next(stream)  # in flight on the worker
            assert client.delete("ft-a")
            with pytest.raises(NotFoundError, match="ft-a"):
                client.generate("ft-a", "hello", **greedy)
            rest = list(stream)  # drains: the request that was running finishes in full
            assert len(first.token_ids) + sum(len(t.token_ids) for t in rest) == LONG
            assert rest[-1].finish_reason == "length"
            wait_until(lambda: not resident_anywhere(r, "ft-a"), 10, "the worker drops the deleted delta")
            wait_until(lambda: not any(cache.rglob("*.safetensors")), 10, "the disk cache loses its files")
            assert "ft-a" not in cli_models(scheduler.address)
            assert "ft-a" not in {m.id for m in api.models.list().data}
            with pytest.raises(openai.NotFoundError):
                api.completions.create(model="ft-a", prompt="hello", max_tokens=2)

            client.push(artifacts["ft-b"], "ft-a", progress=False)  # same name, other weights
            assert client.generate("ft-a", "hello", **greedy).token_ids == greedy_reference(merged["ft-b"], list(b"hello"), MAX_TOKENS)

            client.push(artifacts["ft-a"], "ft-a", overwrite=True, progress=False)  # replaced in place
            wait_until(lambda: not resident_anywhere(r, "ft-a"), 10, "the worker drops the overwritten copy")
            assert client.generate("ft-a", "hello", **greedy).token_ids == greedy_reference(merged["ft-a"], list(b"hello"), MAX_TOKENS)
    finally:
        r.close()
        stop(gateway)
