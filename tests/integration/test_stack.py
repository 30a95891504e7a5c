"""The whole stack as real processes: redis-server + 1 delta store + 2 workers + 2 schedulers.

Promises checked: concurrent requests mixing the base and two fine-tunes (one dense fp16 delta,
one OBS-compressed 4-bit 2:4 delta) return, under greedy decoding, exactly the tokens of running
the merged weights alone; killing one scheduler mid-run loses nothing (clients retry the other);
user errors come back as precise status codes with a message saying what to fix.
"""

import concurrent.futures
import signal
import threading
import time

import pytest

from deltazip.client import Client
from deltazip.client.errors import InvalidArgumentError, NotFoundError, UnavailableError
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)
from tests.integration.tiny_models import MAX_TOKENS, PROMPTS, greedy_reference, models  # noqa: F401

pytestmark = pytest.mark.timeout(300)

SERVED = ("tiny-base", "ft-a", "ft-packed")
NUM_REQUESTS = 32


@pytest.fixture
def stack(launcher, models, tmp_path):
    base_dir, artifacts, merged = models
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        for name in SERVED[1:]:
            client.push(artifacts[name], name, progress=False)
    workers = [
        launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2", "--max-deltas-per-batch", "2",
                       "--num-kv-blocks", "64", "--kv-block-size", "8", "--heartbeat-s", "0.5",
                       "--disk-cache-dir", str(tmp_path / f"cache-{i}"))
        for i in range(2)
    ]
    schedulers = [launcher.start("scheduler") for _ in range(2)]
    return schedulers, workers, merged


def generate_with_failover(addresses: list[str], first: int, model: str, prompt: str) -> tuple[list[int], str, int]:
    """Greedy request on scheduler `first`; UNAVAILABLE (scheduler gone) -> the next one. Returns tokens, worker, tries."""
    for attempt in range(len(addresses) * 2):
        address = addresses[(first + attempt) % len(addresses)]
        try:
            with Client(address, timeout_s=120) as client:
                done = client.generate(model, prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            return done.token_ids, done.worker_id, attempt + 1
        except UnavailableError:
            time.sleep(0.2)
    raise AssertionError(f"{model!r} never completed on any scheduler")


def test_mixed_requests_match_merged_weights_and_survive_scheduler_kill(stack):
    schedulers, workers, merged = stack
    addresses = [s.address for s in schedulers]
    jobs = [(SERVED[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(NUM_REQUESTS)]
    completed = threading.Semaphore(0)

    def run(i: int):
        model, prompt = jobs[i]
        result = generate_with_failover(addresses, i % 2, model, prompt)
        completed.release()
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(run, i) for i in range(NUM_REQUESTS)]
        for _ in range(4):  # kill scheduler 0 once a few requests are through and others are in flight
            assert completed.acquire(timeout=120)
        schedulers[0].popen.send_signal(signal.SIGKILL)
        results = [f.result(timeout=240) for f in futures]

    expected = {(m, p): greedy_reference(merged[m], list(p.encode()), MAX_TOKENS) for m, p in set(jobs)}
    for (model, prompt), (tokens, worker_id, _) in zip(jobs, results):
        assert tokens == expected[(model, prompt)], (model, prompt)
        assert worker_id
    assert schedulers[0].popen.wait(timeout=10) == -signal.SIGKILL
    with Client(addresses[1]) as client:  # the survivor still serves after the kill
        tokens = client.generate("ft-packed", PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        assert tokens.token_ids == expected[("ft-packed", PROMPTS[0])]
    assert len({w for _, w, _ in results}) == 2, "both workers should have served requests"


def test_errors_tell_the_user_what_to_fix(stack):
    schedulers, workers, _ = stack
    with Client(schedulers[0].address, timeout_s=60) as client:
        with pytest.raises(NotFoundError, match="no-such-model") as err:
            client.generate("no-such-model", "hi")
        assert "deltazip push" in str(err.value) or "deltazip models" in str(err.value)
        with pytest.raises(InvalidArgumentError, match="top_p"):
            client.generate("ft-a", "hi", top_p=1.5)
        with pytest.raises(InvalidArgumentError, match="temperature"):
            client.generate("ft-a", "hi", temperature=-1.0)
        with pytest.raises(InvalidArgumentError, match="128"):  # the tiny model's context length
            client.generate("tiny-base", "x" * 200)
        for worker in workers:
            worker.popen.send_signal(signal.SIGTERM)
            worker.popen.wait(timeout=30)
        with pytest.raises(UnavailableError, match="worker"):
            client.generate("ft-a", "hi")
