"""Run a DeltaZip stack on this machine: redis-server and `python -m services.<name>` as real processes.

Used by `make demo`, the integration tests and the benchmarks. Every process gets a free loopback
port and a log file; `Launcher.stop_all()` (or leaving a `LocalStack` block) stops them all.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from deltazip.rpc.health import wait_for_serving
from deltazip.rpc.ports import free_port
from deltazip.security.tls import PLAINTEXT, TlsSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = os.environ.get("DELTAZIP_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class Proc:
    """A started process, its address and where its output goes."""

    name: str
    popen: subprocess.Popen
    address: str
    log_path: Path

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""


def stop(proc: Proc, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit code."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=timeout_s)
    return proc.popen.returncode


def start_redis(tmp_dir: Path, port: int = 0, appendonly: bool = False) -> Proc:
    """redis-server on a loopback port (0 = free one), data dir in `tmp_dir`; AOF persistence optional."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if not shutil.which(REDIS_SERVER) and not Path(REDIS_SERVER).exists():
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or set DELTAZIP_REDIS_SERVER")
    port = port or free_port()
    log_path = tmp_dir / "redis.log"
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_dir), "--save", "",
           "--appendonly", "yes" if appendonly else "no", "--protected-mode", "no", "--logfile", str(log_path)]
    proc = Proc("redis", subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT), f"127.0.0.1:{port}", log_path)

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            pid = client.info("server")["process_id"]
            break
        except redis.exceptions.ConnectionError:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"redis-server did not start: {proc.log_tail()}")
            time.sleep(0.02)
    client.close()
    if pid != proc.popen.pid:  # ours could not bind: another stack's redis holds the port
        stop(proc)
        raise RuntimeError(f"port {port} is served by another redis-server (pid {pid}); give each stack its own ports")
    return proc


def start_service(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                  timeout_s: float = 20.0, tls: TlsSettings = PLAINTEXT, port: int = 0) -> Proc:
    """`python -m services.<name> --port P *args` (0 = a free port), waited on until grpc health (over `tls`) says
    SERVING."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = log_dir / f"{name}-{port}.log"
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep e.g. --target dirs
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    cmd = [sys.executable, "-m", f"services.{name}", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    proc = Proc(name, popen, f"127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            wait_for_serving(proc.address, min(1.0, max(deadline - time.monotonic(), 0.05)), tls=tls)
            return proc
        except TimeoutError as exc:
            exited = popen.poll() is not None  # a bad flag or a crash: report it now, not at the deadline
            if exited or time.monotonic() >= deadline:
                stop(proc)
                why = f"exited with code {popen.returncode}" if exited else f"not SERVING: {exc}"
                raise RuntimeError(f"{name} did not start ({why}); its log:\n{proc.log_tail()}") from None


class Launcher:
    """Starts services for one test and stops all of them at the end."""

    def __init__(self, redis_url: str, log_dir: Path, tls: TlsSettings = PLAINTEXT,
                 ports: Callable[[], int] = free_port):
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.tls = tls  # how health probes dial the services (set when they serve TLS)
        self.ports = ports  # where each service's port comes from (a PortRange for stacks side by side)
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, timeout_s: float | None = None) -> Proc:
        """Start `services.<name>` connected to this launcher's Redis (workers get longer to load the base)."""
        timeout_s = timeout_s or (120.0 if name == "worker" else 30.0)
        proc = start_service(name, ["--redis-url", self.redis_url, *args], self.log_dir, env, timeout_s, self.tls,
                             self.ports())
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()


