"""Independent scaling, as real processes: redis-server + 2 delta stores + 3 workers + 2 schedulers.

Promises checked, in order on one stack (each test leaves the stack as the next expects):
routing affinity (repeat requests for a model land where its delta is resident); burst prefetch turns would-be
cold starts into warm hits on a scripted burst (measured against the same burst with the detector held off);
RESOURCE_EXHAUSTED with retry advice when every worker's queue is full; a killed worker's queued requests are
re-routed and nothing is lost silently, and so are those of a hung worker (SIGSTOP) once its heartbeat expires;
a killed store is failed over by workers fetching a delta; a scheduler
killed mid-request loses nothing (the client retries the same request id elsewhere); every dz:* key left in
Redis matches the documented schema (deltazip/cluster/keys.py).
"""

import concurrent.futures
import shutil
import signal
import time

import pytest
import redis

from deltazip.client import Client
from deltazip.client.errors import ResourceExhaustedError, UnavailableError
from deltazip.cluster import keys
from deltazip.stack import Launcher, start_redis, stop
from tests.integration.tiny_models import PROMPTS, models  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(300)

SCHEDULER_FLAGS = ("--rate-tau-s", "2", "--prefetch-interval-s", "0.2", "--burst-rate-per-s", "1.0",
                   "--prefetch-rate-per-worker", "0.25", "--prefetch-window-s", "1", "--affinity-slack", "1",
                   "--max-queue-per-worker", "3", "--worker-check-s", "0.3", "--lease-s", "3")
WORKER_FLAGS = ("--device", "cpu", "--num-device-slots", "2", "--max-deltas-per-batch", "2", "--num-kv-blocks", "64",
                "--kv-block-size", "8", "--max-num-seqs", "1", "--heartbeat-s", "0.3", "--heartbeat-ttl-s", "1.5")
PUSHED = ("ft-a", "ft-b", "ft-packed", "ft-c")  # ft-c: a copy of ft-a's artifact, only ever fetched after a store dies


class Stack:
    def __init__(self, launcher: Launcher, redis_url: str, stores, workers, schedulers):
        self.launcher, self.redis_url = launcher, redis_url
        self.stores, self.workers, self.schedulers = stores, workers, schedulers
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)

    def record(self, request_id: str) -> dict:
        return self.r.hgetall(keys.request(request_id))

    def generate(self, i: int, model: str, request_id: str, max_tokens: int = 4):
        with Client(self.schedulers[i % len(self.schedulers)].address, timeout_s=120) as client:
            return client.generate(model, PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.0,
                                   ignore_eos=True, request_id=request_id)


@pytest.fixture(scope="module")
def stack(models, tmp_path_factory):
    base_dir, artifacts, _ = models
    root = tmp_path_factory.mktemp("scaling")
    shutil.copytree(artifacts["ft-a"], root / "ft-c")
    artifacts = {**artifacts, "ft-c": root / "ft-c"}
    redis_proc = start_redis(root / "redis")
    launcher = Launcher(f"redis://{redis_proc.address}/0", root / "logs")
    try:
        stores = [launcher.start("delta_store", "--root", str(root / f"store-{i}"), "--store-id", f"store-{i}",
                                 "--heartbeat-s", "0.3", "--heartbeat-ttl-s", "1.5") for i in range(2)]
        for store in stores:
            with Client("127.0.0.1:1", store=store.address) as client:
                for name in PUSHED:
                    client.push(artifacts[name], name, progress=False)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # workers start independently, in parallel
            workers = list(pool.map(lambda i: launcher.start("worker", "--base-dir", str(base_dir), *WORKER_FLAGS,
                                                             "--worker-id", f"w{i}", "--disk-cache-dir",
                                                             str(root / f"cache-{i}")), range(3)))
        schedulers = [launcher.start("scheduler", *SCHEDULER_FLAGS, "--scheduler-id", f"s{i}") for i in range(2)]
        yield Stack(launcher, launcher.redis_url, stores, workers, schedulers)
    finally:
        launcher.stop_all()
        stop(redis_proc)


def hold_detector_off(stack: Stack, model: str, seconds: float = 120) -> None:
    """Take the model's prefetch lease as the schedulers would: they then leave it alone (the control runs)."""
    stack.r.set(keys.prefetch_lease(model), "test", px=int(seconds * 1000))


def test_services_register_independently(stack):
    assert stack.r.smembers(keys.stores()) == {"store-0", "store-1"}
    assert stack.r.smembers(keys.workers()) == {"w0", "w1", "w2"}
    assert stack.r.hget(keys.worker("w0"), "num_device_slots") == "2"


def test_repeat_requests_land_where_the_delta_is_resident(stack):
    hold_detector_off(stack, "ft-a")  # routing alone
    outs = [stack.generate(i, "ft-a", f"aff-{i}") for i in range(6)]
    assert len({o.worker_id for o in outs}) == 1, [o.worker_id for o in outs]
    tiers = [stack.record(f"aff-{i}")["tier"] for i in range(6)]
    assert tiers[0] == "remote" and set(tiers[1:]) == {"device"}, tiers


def scripted_burst(stack: Stack, model: str, tag: str) -> float:
    """4 sequential requests (the rate jumps), a pause, then 6 at once; returns the burst's warm-hit rate."""
    for i in range(4):
        stack.generate(i, model, f"{tag}-ramp-{i}")
    time.sleep(1.5)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: stack.generate(i, model, f"{tag}-burst-{i}", max_tokens=8), range(6)))
    tiers = [stack.record(f"{tag}-burst-{i}")["tier"] for i in range(6)]
    return sum(t in ("device", "host") for t in tiers) / len(tiers)


def test_burst_prefetch_turns_cold_starts_into_warm_hits(stack):
    hold_detector_off(stack, "ft-packed")
    without = scripted_burst(stack, "ft-packed", "cold")
    with_prefetch = scripted_burst(stack, "ft-b", "warm")
    holders = [w for w in ("w0", "w1", "w2") if stack.r.zscore(keys.worker_resident(w, "host"), "ft-b") is not None]
    print(f"\nburst warm-hit rate: with prefetch {with_prefetch:.2f}, without {without:.2f}; ft-b on {holders}")
    assert with_prefetch == 1.0 and without < with_prefetch
    assert len(holders) == 3


def test_full_queues_are_resource_exhausted(stack):
    def one(i: int) -> str:
        try:
            stack.generate(i, "ft-a", f"over-{i}", max_tokens=100)
            return "ok"
        except ResourceExhaustedError as exc:
            assert "retry after" in str(exc) and "queue limit" in str(exc)
            return "exhausted"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    print(f"\noverload: {results.count('ok')} served, {results.count('exhausted')} RESOURCE_EXHAUSTED (capacity 9)")
    assert results.count("ok") >= 9 and results.count("exhausted") >= 4


def run_and_break_a_worker(stack: Stack, tag: str, num_requests: int, sig: signal.Signals) -> tuple[str, list[str], dict]:
    """Concurrent ft-a requests; once some worker runs one and queues another, send it `sig`."""
    live = sorted(stack.r.smembers(keys.workers()))

    def one(i: int) -> str:
        try:
            stack.generate(i, "ft-a", f"{tag}-{i}", max_tokens=80)
            return "ok"
        except UnavailableError as exc:
            assert "can be retried" in str(exc)
            return "unavailable"

    with concurrent.futures.ThreadPoolExecutor(num_requests) as pool:
        futures = [pool.submit(one, i) for i in range(num_requests)]
        victim, deadline = None, time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:  # a worker with one running and one waiting
            records = [stack.record(f"{tag}-{i}") for i in range(num_requests)]
            for w in live:
                mine = [r for r in records if r.get("worker_id") == w]
                if {r.get("state") for r in mine} >= {"running", "routed"}:
                    victim = w
            time.sleep(0.01)
        assert victim is not None, "no worker had a queued request"
        stack.workers[int(victim[1])].popen.send_signal(sig)
        results = [f.result(timeout=120) for f in futures]
    return victim, results, {i: stack.record(f"{tag}-{i}") for i in range(num_requests)}


def check_nothing_lost(victim: str, results: list[str], records: dict, what: str) -> None:
    requeued = [r for r in records.values() if int(r["attempts"]) >= 2]
    print(f"\n{what} ({victim}): {results.count('ok')} finished, {results.count('unavailable')} UNAVAILABLE "
          f"(retryable), {len(requeued)} re-routed")
    assert requeued and all(r["state"] == "finished" and r["worker_id"] != victim for r in requeued)
    assert all(r["state"] in ("finished", "failed") for r in records.values())  # nothing left hanging
    assert results.count("ok") == sum(r["state"] == "finished" for r in records.values())


def test_killed_worker_requeues_waiting_requests_and_loses_nothing(stack):
    victim, results, records = run_and_break_a_worker(stack, "kill", 6, signal.SIGKILL)
    check_nothing_lost(victim, results, records, "worker kill")
    # The next test must not route to the dead worker (it would count as a re-route): wait out its heartbeat TTL.
    deadline = time.monotonic() + 10
    while stack.r.exists(keys.worker(victim)) and time.monotonic() < deadline:
        time.sleep(0.1)


def test_hung_worker_is_dropped_when_its_heartbeat_expires(stack):
    victim, results, records = run_and_break_a_worker(stack, "hang", 4, signal.SIGSTOP)
    stack.workers[int(victim[1])].popen.send_signal(signal.SIGKILL)  # a stopped process ignores SIGTERM
    check_nothing_lost(victim, results, records, "worker hang")
    failed = [r["error"] for r in records.values() if r["state"] == "failed"]
    assert all("heartbeat expired" in e for e in failed), failed


def test_killed_store_is_failed_over(stack):
    stack.stores[0].popen.send_signal(signal.SIGKILL)  # first in the workers' store order
    out = stack.generate(0, "ft-c", "fetch-after-store-kill")  # no worker has ft-c yet: it must be fetched
    assert out.token_ids and stack.record("fetch-after-store-kill")["tier"] == "remote"
    assert stack.r.exists(keys.store("store-0")), "store-0 was still listed (first) when the worker fetched"
    deadline = time.monotonic() + 5
    while stack.r.exists(keys.store("store-0")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.r.exists(keys.store("store-0")), "a dead store's heartbeat key must expire"


def test_scheduler_kill_loses_nothing(stack):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(stack.generate, 0, "ft-a", "req-sched-kill", 100)
        deadline = time.monotonic() + 30
        while stack.record("req-sched-kill").get("state") not in ("running",) and time.monotonic() < deadline:
            time.sleep(0.01)
        stack.schedulers[0].popen.send_signal(signal.SIGKILL)
        with pytest.raises(UnavailableError):
            first.result(timeout=30)
    out = stack.generate(1, "ft-a", "req-sched-kill")  # the client's retry, same id, on the other replica
    record = stack.record("req-sched-kill")
    assert out.token_ids and record["state"] == "finished" and int(record["attempts"]) >= 2
    stack.schedulers[0] = stack.launcher.start("scheduler", *SCHEDULER_FLAGS, "--scheduler-id", "s0-restarted")
    assert stack.generate(0, "ft-b", "after-restart").token_ids
    deadline = time.monotonic() + 10  # the dead scheduler's queue places expire with their lease
    while time.monotonic() < deadline:
        now = int(time.time() * 1000)
        if all(stack.r.zcount(keys.worker_inflight(w), now, "+inf") == 0 for w in ("w0", "w1", "w2")):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("queue places of the killed scheduler never expired")


def test_every_redis_key_matches_the_documented_schema(stack):
    found = {}
    for key in stack.r.scan_iter("*"):
        spec = keys.match(key)
        assert spec is not None, f"{key} is not documented in deltazip/cluster/keys.py"
        assert stack.r.type(key) == spec.type, (key, spec.type)
        found.setdefault(spec.pattern, key)
    expected = {s.pattern for s in keys.schema()}
    print(f"\nschema: {len(found)} of {len(expected)} documented patterns present: {sorted(found)}")
    assert {"dz:base", "dz:worker:<id>", "dz:worker:<id>:resident:<tier>", "dz:store:<id>", "dz:queue:<model>",
            "dz:queues", "dz:request:<request_id>", "dz:models", "dz:model:<name>"} <= set(found)
