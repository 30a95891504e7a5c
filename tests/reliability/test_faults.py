"""Faults on a real stack: redis-server (AOF) + 2 delta stores + 2 workers + 2 schedulers, all real processes.

Every test states its promise and asserts it: each request either completes with exactly the tokens of the
merged reference weights (greedy) or fails with a precise status; nothing is lost silently. In file order
(later tests expect the stack the earlier ones leave):
a corrupted shard in a store is detected by sha256 and fetched from the other store, never served; a shard
corrupted in a worker's disk cache is detected, refetched and never served; Redis killed and restarted with
AOF keeps the registry and the stack serves again once it reconnects; a killed scheduler fails only its own
streams (UNAVAILABLE) and the same request id completes on the other; a worker killed mid-stream fails the
streamed requests with a retryable UNAVAILABLE while its queued ones are re-routed and complete.
"""

import concurrent.futures
import signal
import time
from pathlib import Path

import grpc
import pytest
import redis

from deltazip.client import Client
from deltazip.client.errors import DeltaZipError, UnavailableError
from deltazip.cluster import keys
from deltazip.stack import Launcher, start_redis, stop
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.tiny_models import greedy_reference
from tests.reliability.conftest import push_all

pytestmark = pytest.mark.timeout(240)

WORKER_FLAGS = ("--device", "cpu", "--num-device-slots", "2", "--max-deltas-per-batch", "2", "--num-kv-blocks", "96",
                "--kv-block-size", "8", "--max-num-seqs", "1", "--heartbeat-s", "0.3", "--heartbeat-ttl-s", "1.5")
SCHEDULER_FLAGS = ("--worker-check-s", "0.3", "--lease-s", "3")
MAX_TOKENS = 24


class FaultStack:
    def __init__(self, root: Path, models):
        self.root, self.models = root, models
        self.redis = start_redis(root / "redis", appendonly=True)
        self.redis_port = int(self.redis.address.split(":")[1])
        self.launcher = Launcher(f"redis://{self.redis.address}/0", root / "logs")
        self.r = redis.Redis.from_url(self.launcher.redis_url, decode_responses=True)
        self.references: dict[tuple[str, str, int], list[int]] = {}

    def start(self) -> None:
        flags = ("--heartbeat-s", "0.3", "--heartbeat-ttl-s", "1.5")
        self.stores = [self.launcher.start("delta_store", "--root", str(self.root / f"store-{i}"), "--store-id",
                                           f"store-{i}", *flags) for i in range(2)]
        for i, store in enumerate(self.stores):
            push_all(store.address, self.models)
            with Client("127.0.0.1:1", store=store.address) as client:
                client.push(self.models.artifacts["ft-b"], "ft-x", progress=False)  # on both stores
                if i == 0:
                    client.push(self.models.artifacts["ft-a"], "ft-y", progress=False)  # on store-0 only
        order = ",".join(s.address for s in self.stores)  # store-0 first: the one the tests corrupt
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            self.workers = list(pool.map(lambda i: self.launcher.start(
                "worker", "--base-dir", str(self.models.base_dir), *WORKER_FLAGS, "--worker-id", f"w{i}",
                "--store-addresses", order, "--disk-cache-dir", str(self.root / f"cache-{i}")), range(2)))
        self.schedulers = [self.launcher.start("scheduler", *SCHEDULER_FLAGS, "--scheduler-id", f"s{i}")
                           for i in range(2)]

    def reference(self, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (model, prompt, max_tokens)
        if key not in self.references:
            merged = self.models.merged["ft-b" if model == "ft-x" else "ft-a" if model == "ft-y" else model]
            self.references[key] = greedy_reference(merged, list(prompt.encode()), max_tokens)
        return self.references[key]

    def generate(self, model: str, prompt: str, scheduler: int = 0, max_tokens: int = MAX_TOKENS, **kw):
        with Client(self.schedulers[scheduler].address, timeout_s=60) as client:
            return client.generate(model, prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)

    def stop(self) -> None:
        self.launcher.stop_all()
        stop(self.redis)


@pytest.fixture(scope="module")
def fstack(rmodels, tmp_path_factory):
    stack = FaultStack(tmp_path_factory.mktemp("faults"), rmodels)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_of(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def test_corrupt_shard_in_a_store_is_refetched_from_another_never_served(fstack):
    """store-0 (first in every worker's list) holds a bit-flipped shard of ft-x: the worker detects it by sha256,
    fetches the file again from store-1 and serves the right tokens. ft-y exists only on store-0: after the
    corruption it fails with DATA_LOSS saying the checksum does not match, and nothing is generated from it."""
    corrupt(shard_of(fstack.root / "store-0" / "ft-x"))
    corrupt(shard_of(fstack.root / "store-0" / "ft-y"))
    done = fstack.generate("ft-x", "hello world")
    assert done.token_ids == fstack.reference("ft-x", "hello world")
    worker_log = fstack.workers[int(done.worker_id[1])].log_tail(400_000)
    assert "sha256" in worker_log or "ft-x" in worker_log
    with pytest.raises(DeltaZipError) as err:
        fstack.generate("ft-y", "hello world")
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "sha256" in err.value.message, str(err.value)
    for i in range(2):
        assert not (fstack.root / f"cache-{i}" / "ft-y").exists(), "a corrupted artifact reached a disk cache"


def test_corrupt_shard_in_worker_disk_cache_is_refetched(fstack):
    """A delta's shard goes bad in a worker's disk cache after it was verified: the next load from disk detects it
    (sha256 as read), drops the copy, fetches it again and serves the right tokens; nothing corrupt is served."""
    done = fstack.generate("ft-a", "the quick brown fox")
    assert done.token_ids == fstack.reference("ft-a", "the quick brown fox")
    wid = done.worker_id
    with grpc.insecure_channel(fstack.workers[int(wid[1])].address) as channel:  # keep only the disk copy
        evicted = worker_pb2_grpc.WorkerStub(channel).EvictDelta(
            worker_pb2.EvictDeltaRequest(model="ft-a", tier=common_pb2.RESIDENCY_TIER_HOST), timeout=10)
    assert evicted.evicted
    cached = shard_of(fstack.root / f"cache-{wid[1]}" / "ft-a")
    corrupt(cached)
    for prompt in ("the quick brown fox", "DeltaZip"):  # whichever worker runs them, tokens are right
        assert fstack.generate("ft-a", prompt).token_ids == fstack.reference("ft-a", prompt)
    worker_log = fstack.workers[int(wid[1])].log_tail(400_000)
    if "disk_copy_corrupt" not in worker_log:  # routed to the other worker: force the load on this one
        with grpc.insecure_channel(fstack.workers[int(wid[1])].address) as channel:
            worker_pb2_grpc.WorkerStub(channel).LoadDelta(worker_pb2.LoadDeltaRequest(model="ft-a"), timeout=30)
        worker_log = fstack.workers[int(wid[1])].log_tail(400_000)
    assert "disk_copy_corrupt" in worker_log
    from deltazip.artifact import verify
    verify(cached.parent)  # the copy on disk is whole again


def test_redis_restart_with_aof_keeps_registry_and_recovers(fstack):
    """Redis is killed (-9) while a request streams, and restarted on the same port with its AOF: the streaming
    request still completes (all tokens, OK: relaying needs no Redis); the model registry is intact; requests
    during the outage fail with UNAVAILABLE naming Redis; once it is back every service reconnects by itself and
    requests complete with the right tokens."""
    before = fstack.r.smembers(keys.models())
    assert {"ft-a", "ft-b", "ft-x", "ft-y"} <= before
    time.sleep(1.2)  # appendfsync everysec: what was written a second ago is on disk
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(fstack.generate, "ft-b", "DeltaZip", 1, 160, request_id="redis-dies")
        deadline = time.monotonic() + 30
        while fstack.r.hget(keys.request("redis-dies"), "state") != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        fstack.redis.popen.send_signal(signal.SIGKILL)
        fstack.redis.popen.wait(10)
        assert streaming.result(timeout=60).token_ids == fstack.reference("ft-b", "DeltaZip", 160)
    with pytest.raises(UnavailableError) as err:
        fstack.generate("ft-a", "a")
    assert "cannot reach Redis" in err.value.message
    fstack.redis = start_redis(fstack.root / "redis", port=fstack.redis_port, appendonly=True)
    assert fstack.r.smembers(keys.models()) == before
    assert fstack.r.hgetall(keys.model("ft-a")), "registry entry lost"
    deadline, last = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        try:
            done = fstack.generate("ft-b", "hello world", scheduler=1)
            break
        except UnavailableError as exc:  # workers re-publish their heartbeat within --heartbeat-s
            assert "cannot reach Redis" not in exc.message, f"Redis is back but a service did not reconnect: {exc}"
            last = exc
            time.sleep(0.2)
    else:
        raise AssertionError(f"stack did not recover after the Redis restart: {last}")
    assert done.token_ids == fstack.reference("ft-b", "hello world")
    # the request above may have run on w1 as soon as w1 was back; w0 re-registers on one of its next heartbeats
    # (every 0.3 s, after its own reconnect): give it a few, not the one that races w1's
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not fstack.r.exists(keys.worker("w0")):
        time.sleep(0.1)
    assert fstack.r.smembers(keys.workers()) >= {"w0", "w1"} or fstack.r.exists(keys.worker("w0"))


def test_redis_restart_without_its_data_is_rebuilt(fstack):
    """Redis comes back empty (no persistence, or a lost AOF): the stores re-register the models on their disks and
    the workers re-publish the base and their heartbeats, so the stack serves again without any restart."""
    fstack.redis.popen.send_signal(signal.SIGKILL)
    fstack.redis.popen.wait(10)
    time.sleep(0.8)  # a few failed heartbeats
    fstack.redis = start_redis(fstack.root / "redis-empty", port=fstack.redis_port, appendonly=False)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not ({"ft-a", "ft-b", "ft-x", "ft-y"} <= fstack.r.smembers(keys.models())
                                               and fstack.r.exists(keys.base())):
        time.sleep(0.1)
    assert {"ft-a", "ft-b", "ft-x", "ft-y"} <= fstack.r.smembers(keys.models()) and fstack.r.exists(keys.base())
    time.sleep(0.5)  # worker heartbeats
    done = fstack.generate("ft-a", "hello world", scheduler=1)  # no retry: every client reconnected by itself
    assert done.token_ids == fstack.reference("ft-a", "hello world")


def test_scheduler_kill_fails_only_its_streams(fstack):
    """A scheduler killed while its request is at a worker: its client gets UNAVAILABLE; the same request id
    sent to the other scheduler completes with the right tokens; nothing else notices (the other scheduler's
    requests all complete with the right tokens).

    The tiny model decodes a whole request in a few ms, faster than this test can poll Redis, so the other
    scheduler's requests are queued at the workers first (one sequence at a time each): the victim then waits
    there long enough, routed, for the kill to land while it is in flight."""
    others = [("ft-b" if i % 2 else "ft-a", f"busy {i % 2}") for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(len(others) + 1) as pool:
        busy = [pool.submit(fstack.generate, model, prompt, 1, 64, request_id=f"sched-kill-busy-{i}")
                for i, (model, prompt) in enumerate(others)]
        first = pool.submit(fstack.generate, "ft-a", "hello world", 0, 64, request_id="sched-kill")
        deadline = time.monotonic() + 30
        while (fstack.r.hget(keys.request("sched-kill"), "state") not in ("routed", "running")
               and time.monotonic() < deadline):
            time.sleep(0.002)
        assert fstack.r.hget(keys.request("sched-kill"), "state") in ("routed", "running"), "never reached a worker"
        fstack.schedulers[0].popen.send_signal(signal.SIGKILL)
        with pytest.raises(UnavailableError):
            first.result(timeout=30)
        for (model, prompt), future in zip(others, busy):
            assert future.result(timeout=60).token_ids == fstack.reference(model, prompt, 64)
    done = fstack.generate("ft-a", "hello world", scheduler=1, max_tokens=64, request_id="sched-kill")
    assert done.token_ids == fstack.reference("ft-a", "hello world", 64)
    record = fstack.r.hgetall(keys.request("sched-kill"))
    assert record["state"] == "finished" and int(record["attempts"]) >= 2
    fstack.schedulers[0] = fstack.launcher.start("scheduler", *SCHEDULER_FLAGS, "--scheduler-id", "s0-again")


def test_worker_kill_mid_stream(fstack):
    """Six concurrent requests; once a worker streams one and has another queued, it is killed -9. Streamed
    requests fail with UNAVAILABLE saying they can be retried; queued ones are re-routed to the other worker and
    complete with the right tokens; every request record ends finished or failed; nothing is lost."""
    prompts = [f"request {i % 2}" for i in range(6)]

    def one(i: int):
        try:
            return fstack.generate("ft-b", prompts[i], scheduler=i % 2, max_tokens=64, request_id=f"wkill-{i}")
        except UnavailableError as exc:
            assert "can be retried" in exc.message or "retry" in exc.message, exc.message
            return exc

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        victim, deadline = None, time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            records = [fstack.r.hgetall(keys.request(f"wkill-{i}")) for i in range(6)]
            for w in ("w0", "w1"):
                states = {r.get("state") for r in records if r.get("worker_id") == w}
                if {"running", "routed"} <= states:
                    victim = w
            time.sleep(0.005)
        assert victim is not None, "no worker had one request streaming and one queued"
        fstack.workers[int(victim[1])].popen.send_signal(signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    records = [fstack.r.hgetall(keys.request(f"wkill-{i}")) for i in range(6)]
    assert all(records), f"a request left no record: {results}"
    ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    for i in ok:
        assert results[i].token_ids == fstack.reference("ft-b", prompts[i], 64), i
    rerouted = [r for r in records if int(r["attempts"]) >= 2]
    print(f"\nworker kill ({victim}): {len(ok)} completed, {6 - len(ok)} UNAVAILABLE, {len(rerouted)} re-routed")
    assert 6 - len(ok) >= 1, "the streamed request should have failed"
    assert rerouted and all(r["state"] == "finished" and r["worker_id"] != victim for r in rerouted)
    assert all(r["state"] in ("finished", "failed") for r in records)
    assert len(ok) == sum(r["state"] == "finished" for r in records)
