"""`make demo`: the whole stack on this machine, serving one base model and two real fine-tunes.

Starts redis-server, a delta store, a worker and a scheduler as separate processes, pushes the two
committed demo deltas (demo/deltas/: SmolLM2-135M-Instruct fine-tuned on arithmetic word problems
and on Python functions, compressed 2-bit 2:4), asks the same question of the base and of each
fine-tune through the SDK, streams the answers, prints where each ran, its TTFT and tokens/s, and
stops everything it started.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from deltazip.client import Client
from deltazip.convert.base import default_base_dir
from deltazip.stack import REPO_ROOT, Launcher, start_redis, stop

DEMO_DELTAS = REPO_ROOT / "demo" / "deltas"
DEFAULT_PROMPTS = (
    "Mia has 17 stickers and gets 25 more. How many stickers does Mia have now?",
    "Write a Python function `is_leap(year)`: Return True for leap years.",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deltazip.demo", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", help="a question asked of every model (repeatable)")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--deltas", type=Path, default=DEMO_DELTAS, help="folder of delta artifacts to push")
    p.add_argument("--keep-logs", action="store_true", help="keep the services' log folder")
    return p.parse_args(argv)


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def start_stack(work: Path, base_dir: Path) -> tuple[Launcher, object, dict[str, str]]:
    """redis + delta_store + worker + scheduler, each a real process on a free loopback port."""
    redis_proc = start_redis(work / "redis")
    launcher = Launcher(f"redis://{redis_proc.address}/0", work / "logs")
    try:
        store = launcher.start("delta_store", "--root", str(work / "store"))
        print(f"  delta store  {store.address}", flush=True)
        worker = launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu",
                                "--disk-cache-dir", str(work / "worker-cache"), "--max-num-seqs", "8")
        print(f"  worker       {worker.address}  (base {base_dir.name}, CPU)", flush=True)
        scheduler = launcher.start("scheduler")
        print(f"  scheduler    {scheduler.address}", flush=True)
    except BaseException:
        launcher.stop_all()
        stop(redis_proc)
        raise
    return launcher, redis_proc, {"store": store.address, "scheduler": scheduler.address}


def ask(client: Client, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one chat answer to stdout; returns timing facts."""
    start = time.perf_counter()
    first_token_s = None
    num_tokens = 0
    last = None
    print("  ", end="", flush=True)
    for token in client.stream(model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                               temperature=0.0):
        if token.token_ids and first_token_s is None:
            first_token_s = time.perf_counter() - start
        num_tokens += len(token.token_ids)
        print(token.text.replace("\n", "\n  "), end="", flush=True)
        last = token
    elapsed = time.perf_counter() - start
    print(flush=True)
    decode_s = elapsed - (first_token_s or 0.0)
    return {
        "worker": last.worker_id if last else "?",
        "ttft_ms": (last.usage.ttft_ms if last and last.usage else 0.0) or 1000 * (first_token_s or 0.0),
        "tokens": num_tokens,
        "tokens_per_s": (num_tokens - 1) / decode_s if num_tokens > 1 and decode_s > 0 else 0.0,
        "finish": last.finish_reason if last else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.perf_counter()
    banner("base model")
    base_dir = Path(default_base_dir())
    print(f"  {base_dir}", flush=True)
    deltas = sorted(p for p in args.deltas.iterdir() if (p / "manifest.json").exists())
    if not deltas:
        print(f"no delta artifacts in {args.deltas}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="deltazip-demo-"))
    banner("starting redis, delta store, worker, scheduler")
    launcher, redis_proc, addr = start_stack(work, base_dir)
    try:
        with Client(addr["scheduler"], store=addr["store"]) as client:
            banner("pushing compressed deltas to the store")
            for path in deltas:
                client.push(path, path.name, progress=True)
            models = client.models()
            for m in models:
                kind = "base" if m.is_base else f"{m.compression}, {m.compression_ratio:.1f}x smaller than fp16"
                print(f"  {m.name:<24} {kind}", flush=True)
            base_name = next(m.name for m in models if m.is_base)
            results = {}
            for prompt in args.prompt or DEFAULT_PROMPTS:
                for model in [base_name] + [p.name for p in deltas]:
                    banner(f"{model}: {prompt}")
                    r = results[(model, prompt)] = ask(client, model, prompt, args.max_tokens)
                    print(f"  [ran on {r['worker']} | TTFT {r['ttft_ms']:.0f} ms | {r['tokens']} tokens "
                          f"at {r['tokens_per_s']:.1f} tok/s | finish {r['finish']}]", flush=True)
    finally:
        banner("stopping everything the demo started")
        launcher.stop_all()
        stop(redis_proc)
        if args.keep_logs:
            print(f"  logs kept in {work / 'logs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
