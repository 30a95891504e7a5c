"""Host time of a cuBLAS GEMM call on a row count it has not seen before, against one it has (device).

Eager prefill steps run every linear on the step's token count T, which is new on most steps in serving (prompt
lengths vary). This times the host side of `F.linear(x[T, K], W[N, K])` for the Llama-2-7B linears (the worker's
fused q/k/v and gate/up) three ways, each call timed on its own with the GPU never holding the host back (the
launch queue is far from full):
- `fresh`: T values this process has never run for that shape (what serving's prefill steps pay);
- `repeat`: the same T values again, in the same order;
- `bucketed`: the fresh T values rounded up to a multiple of --bucket rows (x copied into a zero-padded buffer of
  that many rows first, the copy included): what a step pays when its GEMMs only ever see bucketed row counts.
Prints and writes JSON: bench/results/gemm-shapes-<gpu>[-label]-<date>.json (bench/results_io.py; the commit from
git or BENCH_COMMIT). The physical floor is the launch itself (a small torch kernel's host time is measured for
scale).

  python bench/gemm_shapes.py [--count 120] [--bucket 64] [--label x]
"""

import argparse
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_io import git_commit, write_results  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def host_us(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=120, help="distinct row counts per shape")
    p.add_argument("--min-rows", type=int, default=17)
    p.add_argument("--max-rows", type=int, default=1500)
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--out", default="bench/results", help="results folder")
    p.add_argument("--label", default="", help="added to the device name in the file name")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    rng = random.Random(0)
    values = rng.sample(range(a.min_rows, a.max_rows + 1), 3 * a.count)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.float16, device=dev) * 0.02
        x = torch.randn(a.max_rows + a.bucket, k, dtype=torch.float16, device=dev)
        pad = torch.zeros_like(x)
        fresh_t = values[:a.count]
        bucket_t = values[a.count:2 * a.count]  # T values not seen by the other arms (their buckets may be)
        fresh = [host_us(lambda t=t: F.linear(x[:t], w)) for t in fresh_t]
        torch.cuda.synchronize()
        repeat = [host_us(lambda t=t: F.linear(x[:t], w)) for t in fresh_t]
        torch.cuda.synchronize()

        def bucketed(t: int) -> None:
            tb = -(-t // a.bucket) * a.bucket
            pad[:t].copy_(x[:t])
            F.linear(pad[:tb], w)[:t]

        for t in bucket_t:  # the buckets' first calls: what a warm-up at start pays once
            bucketed(t)
        torch.cuda.synchronize()
        bucket = [host_us(lambda t=t: bucketed(t)) for t in values[2 * a.count:]]
        torch.cuda.synchronize()
        row = {"shape": name, "n": n, "k": k, "count": a.count, "fresh_us": statistics.median(fresh),
               "fresh_mean_us": statistics.mean(fresh), "repeat_us": statistics.median(repeat),
               "repeat_mean_us": statistics.mean(repeat), "bucketed_us": statistics.median(bucket),
               "bucketed_mean_us": statistics.mean(bucket)}
        row["fresh_over_repeat"] = row["fresh_mean_us"] / row["repeat_mean_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    empty = torch.empty(0, device=dev)
    small = statistics.median(host_us(lambda: torch.add(empty, 1)) for _ in range(200))
    device = torch.cuda.get_device_name()
    path = write_results(Path(a.out), "gemm-shapes", f"{device}-{a.label}" if a.label else device,
                         {"bench": "gemm_shapes", "device": device, "commit": git_commit(),
                          "date": datetime.date.today().isoformat(), "config": vars(a), "torch": torch.__version__,
                          "small_kernel_us": small, "rows": rows})
    print(f"small torch kernel: {small:.1f} us host; wrote {path}")


if __name__ == "__main__":
    main()
