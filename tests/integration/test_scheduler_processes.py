"""--processes: one scheduler as N processes on one port (SO_REUSEPORT), as real processes.

Checked: every process comes up under its own scheduler id; calls from 8 client processes all succeed and
spread over more than one process; a child killed by SIGKILL is restarted; SIGTERM to the scheduler stops every
process; children exit when the scheduler itself is SIGKILLed; --processes > 1 without a fixed port is refused.
"""

import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.relay_fake_worker import BASE
from bench.scaleout_stack import cpu_seconds
from deltazip.client import Client
from deltazip.rpc.health import wait_for_serving
from deltazip.rpc.ports import free_port
from deltazip.stack import REPO_ROOT, start_redis, stop

pytestmark = pytest.mark.timeout(180)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    # multiprocessing's spawn also starts a resource tracker: keep the scheduler processes only
    return [c for c in found if b"services.scheduler" in Path(f"/proc/{c}/cmdline").read_bytes()
            or b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _calls(address: str) -> list[str]:
    with Client(address, timeout_s=60) as client:
        return [client.generate(BASE, "hello", max_tokens=16, temperature=0.0, ignore_eos=True).text for _ in range(8)]


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    redis_proc = start_redis(tmp_path / "redis")
    url = f"redis://{redis_proc.address}/0"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    fake = subprocess.Popen([sys.executable, "-m", "bench.relay_fake_worker", "--redis-url", url, "--port",
                             str(free_port()), "--chunk-tokens", "4"], cwd=REPO_ROOT, env=env)
    try:
        yield url, env, tmp_path
    finally:
        fake.terminate()
        fake.wait(30)
        stop(redis_proc)


def start_scheduler(url, env, tmp_path, processes: int):
    port = free_port()
    log = open(tmp_path / f"scheduler-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--host", "127.0.0.1", "--port", str(port),
                             "--redis-url", url, "--base-name", BASE, "--processes", str(processes),
                             "--grace-s", "1"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for_serving(f"127.0.0.1:{port}", 30.0)
    return proc, f"127.0.0.1:{port}", tmp_path / f"scheduler-{port}.log"


def ready_ids(log_path: Path) -> set[str]:
    ids = set()
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "scheduler_ready":
            ids.add(event["scheduler_id"])
    return ids


def test_processes_share_the_port_restart_and_stop_together(cluster):
    url, env, tmp_path = cluster
    proc, address, log_path = start_scheduler(url, env, tmp_path, 3)
    try:
        ids = wait_until(lambda: ready_ids(log_path) if len(ready_ids(log_path)) == 3 else None, 60, "3 ready lines")
        assert {i.rsplit("-", 1)[1] for i in ids} == {"p0", "p1", "p2"}
        kids = wait_until(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 30, "2 children")
        pids = [proc.pid, *kids]
        before = {pid: cpu_seconds(pid) for pid in pids}

        # one client process = one connection (channels of one process share theirs); the kernel spreads them
        with concurrent.futures.ProcessPoolExecutor(8, mp_context=multiprocessing.get_context("spawn")) as pool:
            texts = [t for batch in pool.map(_calls, [address] * 8) for t in batch]
        assert len(texts) == 64 and all(len(t) == 16 for t in texts)
        busy = [pid for pid in pids if cpu_seconds(pid) - before[pid] >= 0.03]
        assert len(busy) >= 2, {pid: cpu_seconds(pid) - before[pid] for pid in pids}

        os.kill(kids[0], signal.SIGKILL)  # the group restarts it
        wait_until(lambda: len(children(proc.pid)) == 2 and kids[0] not in children(proc.pid), 30, "a restart")
        with Client(address, timeout_s=60) as client:
            assert client.generate(BASE, "hi", max_tokens=4, temperature=0.0, ignore_eos=True).text
        kids = children(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    wait_until(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 15, "children stopped with the parent")


def test_children_exit_when_the_scheduler_is_killed(cluster):
    url, env, tmp_path = cluster
    proc, _, log_path = start_scheduler(url, env, tmp_path, 2)
    kids = wait_until(lambda: children(proc.pid) if len(children(proc.pid)) == 1 else None, 30, "1 child")
    proc.kill()
    proc.wait(10)
    wait_until(lambda: not any(Path(f"/proc/{k}").exists() and Path(f"/proc/{k}/stat").read_text().split()[2] != "Z"
                               for k in kids), 15, "the orphaned child to exit")


def test_processes_need_a_fixed_port():
    done = subprocess.run([sys.executable, "-m", "services.scheduler", "--port", "0", "--processes", "2"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--processes > 1 needs a fixed --port" in done.stderr
