"""Run a whole DeltaZip stack on this machine until Ctrl-C, for the other examples to talk to.

    python examples/local_stack.py            # redis + store + worker (CPU) + scheduler + gateway, demo deltas pushed

Prints the addresses and the `export` lines the examples read (DELTAZIP_SCHEDULER, DELTAZIP_STORE,
OPENAI_BASE_URL). With docker compose (`docker compose up`) the same addresses are 127.0.0.1:50051,
127.0.0.1:50052 and http://127.0.0.1:8000/v1.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltazip.client import Client  # noqa: E402
from deltazip.convert.base import default_base_dir  # noqa: E402
from deltazip.stack import REPO_ROOT, Launcher, start_redis, stop  # noqa: E402


def start_gateway(scheduler: str, port: int, log_dir: Path) -> subprocess.Popen:
    """`python -m services.gateway` on `port`, waited on until GET /health answers."""
    log = open(log_dir / "gateway.log", "wb")
    popen = subprocess.Popen([sys.executable, "-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port),
                              "--scheduler", scheduler], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return popen
        except OSError:
            time.sleep(0.1)
    popen.kill()
    raise RuntimeError(f"gateway did not start; see {log_dir / 'gateway.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", default=None, help="base model folder (default: the demo's SmolLM2)")
    parser.add_argument("--deltas", type=Path, default=REPO_ROOT / "demo" / "deltas", help="artifacts to push at start")
    parser.add_argument("--gateway-port", type=int, default=8000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deltazip-stack-"))
    redis_proc = start_redis(work / "redis")
    launcher = Launcher(f"redis://{redis_proc.address}/0", work / "logs")
    gateway = None
    try:
        store = launcher.start("delta_store", "--root", str(work / "store"))
        launcher.start("worker", "--base-dir", args.base_dir or str(default_base_dir()), "--device", "cpu",
                       "--disk-cache-dir", str(work / "cache"))
        scheduler = launcher.start("scheduler")
        gateway = start_gateway(scheduler.address, args.gateway_port, work / "logs")
        with Client(scheduler.address, store=store.address) as client:
            for path in sorted(p for p in args.deltas.iterdir() if (p / "manifest.json").exists()):
                client.push(path, path.name, progress=False)
            print("models:", ", ".join(m.name for m in client.models()))
        print(f"export DELTAZIP_SCHEDULER={scheduler.address} DELTAZIP_STORE={store.address} "
              f"OPENAI_BASE_URL=http://127.0.0.1:{args.gateway_port}/v1\n(logs in {work / 'logs'}; Ctrl-C stops all)",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(timeout=10)
            except subprocess.TimeoutExpired:
                gateway.kill()
        launcher.stop_all()
        stop(redis_proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
