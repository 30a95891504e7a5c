"""How fast a worker's host tier reads a delta artifact from its disk cache (`deltazip.artifact.load_delta`).

Every load of a fine-tune that is not in host memory runs this read (a cache miss, a prefetch), so its speed is
part of the cold-start latency of a request. The bench writes one synthetic 7B-shaped delta (`--num-layers` layers,
2-bit 2:4, bench/synthetic.py) and times, in the same run, median of `--repeats`, page cache warm (the file was
just written; a worker's disk cache was just fetched into):
- `load_delta`: one read per shard into one buffer, hashed as it arrives (the sha256 in a second thread), tensors
  as views of the buffer (deltazip/artifact/reader.py);
- `load_delta_stamped`: the same read of a folder whose verified stamp vouches for its shards (a worker's fetcher
  writes one after hashing the download, deltazip/artifact/stamp.py): sizes checked, no sha256, so its limit is
  the copy alone;
- `load_delta_reused`: that stamped read into buffers kept from the previous load (`ReadBuffers`, what a CUDA
  worker does, since it copies every tensor into pinned memory): no page faults of fresh memory during the read;
- `baseline`: what it did before (and what a plain safetensors reader does): the whole file read into bytes,
  hashed, then `safetensors.torch.load`, which copies the bytes into tensors;
- on a CUDA machine, the worker's whole host-tier load (`ArtifactTierIO.load_host`: the stamped read, then every
  tensor copied into pinned memory) into fresh buffers (`host_tier_fresh`) and into reused ones
  (`host_tier_reused`, the worker's default);
- the limits it is measured against, on the same bytes in memory: one `memcpy`-rate copy (`torch` copy into a
  buffer written before: a fresh one costs its page faults too, which is what the reused buffers save) and one
  sha256 pass. (Before session 31 the copy limit was a clone into fresh memory: older results' ratios to it are not
  comparable.) A checked load cannot beat the slower of the two when the read and the hash overlap.

    python -m bench.load_delta --num-layers 4 --repeats 5
Writes bench/results/load-delta-<device>-<date>.json (device: this host, `cpu`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from bench.results_io import git_commit, host_info, write_results


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def baseline_load(artifact: Path) -> int:
    """The previous reader: read_bytes, sha256, safetensors.torch.load per shard; the bytes loaded."""
    from deltazip.artifact import read_manifest

    total = 0
    for shard, entry in read_manifest(artifact).shards.items():
        data = (artifact / shard).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise RuntimeError(f"{shard}: sha256 mismatch")
        total += sum(t.numel() * t.element_size() for t in safetensors_load(data).values())
    return total


def host_tiers() -> tuple:
    """A CUDA worker's host tier (pinned copies) with fresh and with reused read buffers; stamps trusted."""
    from types import SimpleNamespace

    from services.worker.tier_io import ArtifactTierIO

    slots = SimpleNamespace(device=torch.device("cuda"))
    return tuple(ArtifactTierIO(None, slots, trust_stamps=True, reuse_buffers=reuse) for reuse in (False, True))


def reused_load(artifact: Path, pool) -> None:
    """A stamped load into the pool's buffers, all given back (a CUDA worker copies every tensor out first)."""
    from deltazip.artifact import load_delta

    with pool.lease() as lease:
        load_delta(artifact, trust_stamp=True, buffer=lease.take)
        lease.done([])


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.load_delta", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "7b", "13b"), default="7b")
    p.add_argument("--num-layers", type=int, default=4, help="layers of the synthetic delta (0: the shape's own)")
    p.add_argument("--bits", type=int, choices=(2, 4), default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work-dir", type=Path, help="where the synthetic delta goes (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", default="", help="file label instead of 'cpu'")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_layers < 0:
        p.error("--repeats must be >= 1 and --num-layers >= 0")

    from bench.synthetic import write_suite
    from deltazip.artifact import load_delta, read_manifest
    from deltazip.artifact.reader import ReadBuffers
    from deltazip.artifact.stamp import drop_stamp, write_stamp

    pool = ReadBuffers()
    tiers = host_tiers() if torch.cuda.is_available() else ()

    with tempfile.TemporaryDirectory(prefix="dz-load-delta-") as tmp:
        root = args.work_dir or Path(tmp)
        print(f"writing a {args.shape} {args.bits}-bit delta ({args.num_layers or 'all'} layers) under {root} ...",
              flush=True)
        _, artifacts = write_suite(root, args.shape, 1, bits=args.bits, num_layers=args.num_layers)
        artifact = next(iter(artifacts.values()))
        shards = [artifact / name for name in read_manifest(artifact).shards]  # .safetensors or .zst
        disk_bytes = sum(s.stat().st_size for s in shards)
        blob = torch.frombuffer(bytearray(b"".join(s.read_bytes() for s in shards)), dtype=torch.uint8)
        dst = blob.clone()  # the copy limit's destination, touched once before it is timed
        if not disk_bytes:
            raise SystemExit(f"{artifact}: no shard bytes to read")
        manifest = read_manifest(artifact)
        results = {}
        for name, fn in (("baseline", lambda: baseline_load(artifact)),
                         ("load_delta", lambda: load_delta(artifact, trust_stamp=False)),
                         ("load_delta_stamped", lambda: load_delta(artifact, trust_stamp=True)),
                         ("load_delta_reused", lambda: reused_load(artifact, pool)),
                         *[(f"host_tier_{kind}", lambda io=io: io.load_host("d", str(artifact)))
                           for kind, io in zip(("fresh", "reused"), tiers)],
                         ("copy_limit", lambda: dst.copy_(blob)),
                         ("sha256_limit", lambda: hashlib.sha256(memoryview(blob.numpy())).digest())):
            if name == "load_delta_stamped":
                write_stamp(artifact, {shard: entry.sha256 for shard, entry in manifest.shards.items()})
            fn()  # warm: page cache, allocator, imports
            seconds = _median_s(fn, args.repeats)
            results[name] = {"seconds": seconds, "gb_per_s": disk_bytes / seconds / 1e9}
            print(f"  {name:18s} {seconds * 1e3:8.1f} ms  {disk_bytes / seconds / 1e9:6.2f} GB/s", flush=True)
        drop_stamp(artifact)  # a --work-dir is left as it was written
    limit = max(results["copy_limit"]["seconds"], results["sha256_limit"]["seconds"])
    stamped = results["load_delta_stamped"]["seconds"]
    summary = {"speedup_vs_baseline": results["baseline"]["seconds"] / results["load_delta"]["seconds"],
               "load_delta_vs_limit": limit / results["load_delta"]["seconds"],
               "stamped_speedup_vs_load_delta": results["load_delta"]["seconds"] / stamped,
               "stamped_vs_copy_limit": results["copy_limit"]["seconds"] / stamped,
               "reused_speedup_vs_stamped": stamped / results["load_delta_reused"]["seconds"],
               "reused_vs_copy_limit": results["copy_limit"]["seconds"] / results["load_delta_reused"]["seconds"]}
    if "host_tier_reused" in results:  # CUDA: the worker's load with its pinned copies
        summary["host_tier_reused_speedup_vs_fresh"] = (results["host_tier_fresh"]["seconds"]
                                                        / results["host_tier_reused"]["seconds"])
        print(f"host tier (pinned copies): reused buffers {summary['host_tier_reused_speedup_vs_fresh']:.2f}x fresh",
              flush=True)
    print(f"load_delta {summary['speedup_vs_baseline']:.2f}x the baseline, at {summary['load_delta_vs_limit']:.2f} "
          f"of the limit (the slower of one copy and one sha256 pass); with a verified stamp "
          f"{summary['stamped_speedup_vs_load_delta']:.2f}x load_delta, at {summary['stamped_vs_copy_limit']:.2f} of "
          f"the copy limit; into reused buffers {summary['reused_speedup_vs_stamped']:.2f}x that, at "
          f"{summary['reused_vs_copy_limit']:.2f} of the copy limit", flush=True)
    payload = {"bench": "load_delta", "device": "cpu", "host": host_info(), "commit": git_commit(),
               "gpu": torch.cuda.get_device_name() if tiers else None,
               "date": datetime.date.today().isoformat(),
               "config": {"shape": args.shape, "num_layers": args.num_layers, "bits": args.bits,
                          "repeats": args.repeats, "disk_bytes": disk_bytes, "shards": len(shards),
                          "page_cache": "warm"},
               "rows": [{"reader": name, **r} for name, r in results.items()], "summary": summary}
    path = write_results(args.out, "load-delta", args.label or "cpu", payload)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
