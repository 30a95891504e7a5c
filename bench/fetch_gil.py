"""How much a delta download slows the worker's engine loop: in threads of the worker process vs child processes.

A stand-in for the engine (a Python loop of small torch ops, one thread) runs while N downloads of one synthetic
7B-shaped delta come from a real delta store: first with the downloads in threads of this process (DeltaFetcher,
as workers did before `--fetch-processes`), then in child processes (ProcessFetcher). Reported: the loop's
iteration time, median and p90, against the same loop idle, and each download's seconds. The limit it is measured
against is the idle loop itself (ratio 1.0 = no interference).

    python -m bench.fetch_gil --num-layers 4 --downloads 1,4
Writes bench/results/fetch-gil-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.results_io import git_commit, write_results


def engine_iteration(a: torch.Tensor) -> float:
    """One 'step' of Python + small tensor work; returns its seconds."""
    t = time.perf_counter()
    for _ in range(200):
        a @ a
        [i * 2 for i in range(20)]
    return time.perf_counter() - t


def loop_while(busy, a: torch.Tensor) -> list[float]:
    out = []
    while busy():
        out.append(engine_iteration(a))
    return out


def stats(times: list[float], idle_ms: float) -> dict:
    if not times:  # the downloads ended before one loop iteration did
        return {"median_ms": None, "p90_ms": None, "n": 0, "median_over_idle": None}
    med = statistics.median(times) * 1e3
    return {"median_ms": med, "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, "n": len(times),
            "median_over_idle": med / idle_ms}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.fetch_gil", description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=4, help="layers of the 7B-shaped delta (4: 0.32 GB at 4-bit)")
    p.add_argument("--downloads", default="1,4", help="comma list: concurrent downloads per measurement")
    p.add_argument("--idle-s", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    from bench.synthetic import write_suite
    from deltazip.artifact.identity import base_identity
    from deltazip.client import Client
    from deltazip.stack import Launcher, start_redis, stop
    from services.worker.fetch_process import FetchSettings, ProcessFetcher
    from services.worker.fetcher import DeltaFetcher
    from services.worker.store_client import GrpcStoreSource

    torch.set_num_threads(1)
    a = torch.randn(64, 64)
    work = Path(tempfile.mkdtemp(prefix="dz-fetch-gil-"))
    print(f"making a 7B-shaped {args.num_layers}-layer delta in {work}", flush=True)
    base_dir, arts = write_suite(work / "models", "7b", 1, num_layers=args.num_layers)
    ident = base_identity(base_dir)
    delta_bytes = sum(f.stat().st_size for f in arts["ft-000"].rglob("*") if f.is_file())
    redis = start_redis(work / "redis")
    launcher = Launcher(f"redis://{redis.address}/0", work / "logs")
    rows = []
    try:
        store = launcher.start("delta_store", "--root", str(work / "store"))
        with Client("127.0.0.1:1", store=store.address, timeout_s=600) as client:
            client.push(arts["ft-000"], "ft-000", progress=False)
        end = time.monotonic() + args.idle_s
        idle = loop_while(lambda: time.monotonic() < end, a)
        idle_ms = statistics.median(idle) * 1e3
        rows.append({"where": "idle", "downloads": 0, **stats(idle, idle_ms)})
        print(f"idle: loop median {idle_ms:.2f} ms", flush=True)
        for n in [int(x) for x in args.downloads.split(",")]:
            for where in ("threads", "processes"):
                caches = [work / f"cache-{where}-{n}-{i}" for i in range(n)]
                if where == "threads":
                    fetchers = [DeltaFetcher(str(c), lambda: [GrpcStoreSource(store.address)], ident) for c in caches]
                else:
                    fetchers = [ProcessFetcher(FetchSettings(str(c), ident, 5, 1 << 20), lambda: [store.address], 1)
                                for c in caches]
                    for f in fetchers:  # start the children before timing (spawn + imports)
                        f._pool.submit(int).result()
                seconds: list[float] = []

                def one(f) -> None:
                    t = time.perf_counter()
                    f.fetch("ft-000")
                    seconds.append(time.perf_counter() - t)

                threads = [threading.Thread(target=one, args=(f,)) for f in fetchers]
                for t in threads:
                    t.start()
                times = loop_while(lambda: any(t.is_alive() for t in threads), a)
                for t in threads:
                    t.join()
                for f in fetchers:
                    if where == "processes":
                        f.close()
                row = {"where": where, "downloads": n, "download_s": sorted(seconds), **stats(times, idle_ms)}
                rows.append(row)
                if row["n"]:
                    print(f"{n} download(s) in {where}: loop median {row['median_ms']:.2f} ms "
                          f"({row['median_over_idle']:.2f}x idle), p90 {row['p90_ms']:.2f} ms, downloads "
                          f"{', '.join(f'{s:.2f}' for s in sorted(seconds))} s", flush=True)
    finally:
        launcher.stop_all()
        stop(redis)
        shutil.rmtree(work, ignore_errors=True)
    payload = {"bench": "fetch_gil", "device": "cpu", "commit": git_commit(), "date": datetime.date.today().isoformat(),
               "host": {"num_cpus": os.cpu_count(), "machine": platform.machine()}, "num_layers": args.num_layers,
               "delta_bytes": delta_bytes, "rows": rows}
    path = write_results(args.out, "fetch-gil", f"cpu{os.cpu_count()}", payload)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
