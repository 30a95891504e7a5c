"""Scale-out benchmark: 2 delta stores + 2 schedulers + K workers on one host, K = 1..max, Zipf + bursty load.

Starts redis, the stores and the schedulers (bench/scaleout_stack.py), pushes N synthetic fine-tune deltas of a
synthetic base (bench/synthetic.py) to every store, then per K: K fresh workers (one per GPU, or CPU workers),
an untimed warm-up sent straight to each worker (CUDA init, kernel JIT; a delta no workload uses), and the same
saturating Zipf + Gamma-bursty workload replayed by client processes split over both schedulers. Then, on the
largest K: a burst on a cold model (never requested) over a background load, with burst prefetch on and off
(the schedulers restarted with --prefetch-interval-s 0). Reported per run: throughput (and its ratio to K = 1 of
the same run), latencies, the stores' bytes served per second (their own counters, sampled), the workers' fetch
bytes and seconds, CPU use per role.

    python -m bench.scaleout --device cpu --shape tiny --workers 1,2,4      # the CPU run (proves the scripts)
    scripts/bench_scaleout.sh                                               # a GPU box, one worker per GPU
Writes bench/results/scaleout-<device>-<date>.json after every phase (a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results_io import device_name, git_commit, write_results
from bench.scaleout_phases import RESERVE_S, burst_run, latency_entry, scale_point, summarize_run
from bench.scaleout_stack import ScaleoutStack
from bench.workload import WorkloadConfig, generate

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAGS = {  # per device; --worker-flag values come after and win
    "cpu": ["--dtype", "float32", "--num-kv-blocks", "512", "--kv-block-size", "8", "--num-device-slots", "4",
            "--max-deltas-per-batch", "4", "--max-num-seqs", "16"],
    "cuda": ["--dtype", "float16", "--max-num-seqs", "128", "--kv-memory-fraction", "0.3", "--num-device-slots", "16",
             "--max-deltas-per-batch", "8", "--host-cache-bytes", str(12 << 30)],
}
SCHEDULER_FLAGS = ["--max-queue-per-worker", "0"]  # a saturating run queues at the workers, not refused


class Budget:
    """Seconds left until the deadline (0 budget = no deadline)."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + seconds if seconds > 0 else float("inf")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, msg: str) -> None:
        """A progress line stamped with the seconds since the start."""
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--num-gpus", type=int, default=0, help="GPUs to spread workers over (0 = count them)")
    p.add_argument("--workers", type=ints, default=None, help="comma list of K (default: 1,2,4,8 up to the GPUs; cpu 1,2)")
    p.add_argument("--shape", choices=("tiny", "7b", "13b"), default="tiny")
    p.add_argument("--num-layers", type=int, default=0, help="cut the synthetic model's depth (0 = full)")
    p.add_argument("--num-models", type=int, default=16, help="fine-tunes in the Zipf workload")
    p.add_argument("--bits", type=int, choices=(2, 4), default=4)
    p.add_argument("--group-size", type=int, default=0, help="0 = 128 (32 for the tiny shape)")
    p.add_argument("--num-requests", type=int, default=120, help="requests per pass of a scaling point")
    p.add_argument("--requests-per-worker", action="store_true",
                   help="K workers get K x --num-requests (same seed and arrival rate): every K does the same work "
                        "per worker, so the arrival ramp and the drain at the end weigh the same at every K")
    p.add_argument("--rate-rps", type=float, default=40.0, help="offered rate of a scaling point: above what K_max serves")
    p.add_argument("--cv", type=float, default=2.0, help="Gamma arrivals' coefficient of variation")
    p.add_argument("--zipf-alpha", type=float, default=1.5)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=lambda s: s.split(","), default=["cold", "warm"],
                   help="per K: cold (fresh caches, fetches included) and/or warm (the same requests again); or "
                        "resident alone (every delta loaded onto every worker first: steady-state scaling)")
    p.add_argument("--resident-tier", choices=("device", "host"), default="device",
                   help="where the resident pass loads every delta (device needs --num-device-slots >= models)")
    p.add_argument("--num-stores", type=int, default=2)
    p.add_argument("--num-schedulers", type=int, default=2)
    p.add_argument("--store-replicas", type=int, default=0, help="stores each delta is pushed to (0 = all)")
    p.add_argument("--num-clients", type=int, default=2, help="client processes, split over the schedulers")
    p.add_argument("--burst-size", type=int, default=24, help="requests of the cold-model burst (0 = no burst runs)")
    p.add_argument("--burst-at-s", type=float, default=1.0, help="when the burst starts in its run")
    p.add_argument("--burst-span-s", type=float, default=2.0, help="the burst's arrivals spread over this long")
    p.add_argument("--burst-bg-requests", type=int, default=40, help="background requests during a burst run")
    p.add_argument("--burst-bg-rate-rps", type=float, default=10.0)
    p.add_argument("--burst-repeats", type=int, default=1, help="on/off pairs, each on its own cold model")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget: phases that would not fit are "
                   "skipped and said so (0 = none)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--pass-timeout-s", type=float, default=0.0,
                   help="cap on one replay: requests unfinished by then fail, throughput = what finished in the "
                        "window (every request arrives early in a saturating run); 0 = --timeout-s")
    p.add_argument("--worker-flag", action="append", default=[], help="extra worker flag, e.g. --worker-flag=--max-num-seqs=64")
    p.add_argument("--scheduler-flag", action="append", default=[], help="extra scheduler flag")
    p.add_argument("--work-dir", type=Path, help="models, stores, caches and logs (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--logs-out", type=Path, help="also write the services' log tails here (<json stem>-logs.txt)")
    p.add_argument("--label", default="", help="file label instead of the device name")
    p.add_argument("--note", default="", help="a sentence stored in the JSON (what this run is and is not)")
    args = p.parse_args(argv)
    args.group_size = args.group_size or (32 if args.shape == "tiny" else 128)
    args.num_gpus = args.num_gpus or (count_gpus() if args.device == "cuda" else 0)
    if args.device == "cuda" and args.num_gpus < 1:
        p.error("--device cuda but no GPU found (nvidia-smi -L)")
    if args.workers is None:
        args.workers = [k for k in (1, 2, 4, 8) if k <= max(args.num_gpus, 1)] if args.device == "cuda" else [1, 2]
        if args.device == "cuda" and args.num_gpus not in args.workers:
            args.workers.append(args.num_gpus)
    args.workers = sorted(set(args.workers))
    if not args.passes or set(args.passes) - {"cold", "warm", "resident"}:
        p.error(f"--passes takes cold and/or warm, or resident, got {args.passes}")
    if "resident" in args.passes and len(args.passes) > 1:
        p.error("--passes resident runs alone: its workers start with every delta in their disk caches")
    if args.workers[0] < 1 or args.num_models < 1 or args.num_clients < 1 or args.num_stores < 1:
        p.error("--workers, --num-models, --num-clients and --num-stores must be >= 1")
    return args


def device_slots(worker_flags: list[str]) -> int:
    """The --num-device-slots a worker gets from these flags (read with the worker's own parser; else its default)."""
    from services.worker.config import WorkerConfig, build_parser

    given = build_parser().parse_known_args(worker_flags)[0].num_device_slots
    return int(given) if given is not None else WorkerConfig.__dataclass_fields__["num_device_slots"].default


def count_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return sum(line.startswith("GPU ") for line in done.stdout.splitlines())
    return 0


def make_models(args, work: Path, num_deltas: int) -> tuple[Path, list[tuple[str, Path]]]:
    """Synthetic base + deltas, made in a child process (its CUDA context and memory go away with it)."""
    cmd = [sys.executable, "-m", "bench.synthetic", "--shape", args.shape, "--num-layers", str(args.num_layers),
           "--num-deltas", str(num_deltas), "--bits", str(args.bits), "--group-size", str(args.group_size),
           "--device", args.device, "--jobs", str(max(1, min(16, (os.cpu_count() or 1) // 4))),
           "--out", str(work / "models")]
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": python_path}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.synthetic failed:\n{done.stderr[-3000:]}")
    base_dir, *paths = [Path(line) for line in done.stdout.split()]
    return base_dir, [(f"ft-{i:03d}", path) for i, path in enumerate(paths)]


class Run:
    """The result being built; written to disk after every phase."""

    def __init__(self, args, budget: Budget):
        self.args, self.budget = args, budget
        self.device = device_name(args.device)
        self.payload = {
            "bench": "scaleout", "device": self.device, "commit": git_commit(), "date": datetime.date.today().isoformat(),
            "note": args.note, "host": {"num_cpus": os.cpu_count(), "num_gpus": args.num_gpus},
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "summary": {}, "rows": [], "skipped": [], "latencies": [], "phase_s": {}, "complete": False}
        self.path: Path | None = None
        self.delta_paths: dict[str, Path] = {}  # name -> local artifact folder (what was pushed)

    def add(self, row: dict, outcomes=None, point: dict | None = None) -> None:
        self.payload["rows"].append(row)
        if outcomes is not None:
            self.payload["latencies"].append(latency_entry(point or {}, outcomes))
        self.save()

    def add_scale_row(self, row: dict, outcomes) -> None:
        """A scaling pass's row, saved and said."""
        self.add(row, outcomes, {"phase": "scale", "pass": row["pass"], "num_workers": row["num_workers"]})
        ratio = row.get("scaling_vs_1")
        self.budget.say(f"K={row['num_workers']} {row['pass']}: {row['throughput_rps']:.2f} req/s "
                        f"({row['tokens_per_s']:.0f} tok/s, offered {row['offered_rps']:.1f}), ttft p90 "
                        f"{row['ttft_p90_ms']:.0f} ms, failed {row['num_failed']}, store peak "
                        f"{row.get('store_bytes_per_s_peak_1s', 0) / 1e6:.1f} MB/s, workers fetched "
                        f"{row['worker_fetch_bytes'] / 1e9:.2f} GB, vs K=1: {ratio if ratio is None else round(ratio, 2)}")

    def skip(self, what: str, why: str) -> None:
        self.budget.say(f"SKIPPED {what}: {why}")
        self.payload["skipped"].append({"what": what, "why": why})
        self.save()

    def save(self) -> Path:
        self.payload["summary"] = summarize_run(self.payload["rows"])
        self.payload["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.path = write_results(self.args.out, "scaleout", self.args.label or self.device, self.payload)
        return self.path


def prepare(run: Run, work: Path, num_deltas: int) -> tuple[Path, list[str], ScaleoutStack]:
    """Synthetic models, the services, every delta pushed to the stores; returns (base dir, delta names, stack)."""
    args, budget = run.args, run.budget
    t = time.monotonic()
    base_dir, deltas = make_models(args, work, num_deltas)
    run.payload["phase_s"]["make_models"] = time.monotonic() - t
    budget.say(f"made base {base_dir.name} + {len(deltas)} deltas in {time.monotonic() - t:.1f}s; starting services")
    stack = ScaleoutStack(work, args.num_stores, args.num_schedulers, [*SCHEDULER_FLAGS, *args.scheduler_flag])
    try:
        replicas = min(args.store_replicas or args.num_stores, args.num_stores)
        t = time.monotonic()
        # a replica round more only while pushing stays a small part of the budget (the scaling points come first)
        pushed, replicas = stack.push(dict(deltas), replicas, lambda: time.monotonic() - t < 0.12 * (budget.deadline - t))
        push_s = time.monotonic() - t
    except BaseException:
        stack.close()
        raise
    if replicas < min(args.store_replicas or args.num_stores, args.num_stores):
        run.skip("push replicas", f"each delta is on {replicas} store(s) only: pushing took {push_s:.0f}s")
    run.add({"phase": "push", "num_deltas": len(deltas), "num_stores": replicas, "bytes": pushed, "seconds": push_s,
             "bytes_per_s": pushed / push_s, "delta_bytes": pushed / len(deltas) / replicas})
    budget.say(f"pushed {len(deltas)} deltas x {replicas} stores = {pushed / 1e9:.2f} GB in {push_s:.1f}s "
               f"({pushed / push_s / 1e9:.2f} GB/s)")
    run.delta_paths = dict(deltas)
    return base_dir, [n for n, _ in deltas], stack


def run_scaling(run: Run, stack: ScaleoutStack, base_dir: Path, models: list[str], warm_model: str,
                num_burst_runs: int) -> float:
    """Every K that fits the budget, ascending (one between the first and the last is dropped first when time is
    short); returns the forecast of one burst run (s)."""
    args, budget = run.args, run.budget
    def workload(k: int):
        return generate(WorkloadConfig(tuple(models), args.num_requests * (k if args.requests_per_worker else 1),
                                       args.rate_rps, "gamma", args.cv, args.zipf_alpha, args.prompt_len,
                                       4 * args.prompt_len, args.output_len, 4 * args.output_len, args.seed))

    worker_flags = [*WORKER_FLAGS[args.device], *args.worker_flag]
    if "resident" in args.passes and args.resident_tier == "device":
        slots = device_slots(worker_flags)
        if slots < len(models) + 1:  # + the warm-up model: loading more than fit would evict, then reload in the window
            budget.say(f"--resident-tier device: {len(models) + 1} deltas do not fit {slots} GPU slots; loading "
                       "them to host memory instead (give --worker-flag=--num-device-slots=N for device)")
            args.resident_tier = "host"
            run.payload["config"]["resident_tier"] = "host"
    run.payload["config"]["worker_flags_used"] = worker_flags
    run.payload["config"]["scheduler_flags_used"] = [*SCHEDULER_FLAGS, *args.scheduler_flag, "--prefetch-interval-s",
                                                     "0.5 (burst runs with prefetch off: 0)"]
    # a burst run: its arrivals, the tail of its last requests, fresh schedulers, client start
    burst_s = max(args.burst_at_s + args.burst_span_s, args.burst_bg_requests / args.burst_bg_rate_rps) + 15.0
    point_s, overhead_s = None, None  # the first point's cost and its start + warm-up forecast the others
    for k in args.workers:
        is_last = k == args.workers[-1]
        if point_s is not None:
            need = point_s * (1 if is_last else 2) + burst_s * num_burst_runs + RESERVE_S
            need_min = overhead_s + 20.0 * len(args.passes) + RESERVE_S  # the last K alone, its replays cut short
            if budget.left() < need and not (is_last and budget.left() > need_min):
                run.skip(f"scale K={k}", f"{budget.left():.0f}s left, about {need:.0f}s needed")
                continue
        if stack.workers:
            stack.stop_workers()
        t = time.monotonic()
        try:
            seed = {m: run.delta_paths[m] for m in [*models, warm_model]} if "resident" in args.passes else None
            rows = scale_point(stack, args, k, base_dir, warm_model, workload(k), budget, worker_flags, run.add_scale_row,
                               keep_s=burst_s * num_burst_runs, seed=seed)
        except RuntimeError as exc:  # a worker that did not start, a client that failed: the other points still run
            run.skip(f"scale K={k}", f"failed: {str(exc)[-1500:]}")
            continue
        point_s = point_s or time.monotonic() - t + 5.0
        overhead_s = overhead_s or rows[0]["worker_start_s"] + rows[0]["warmup_s"] + rows[0].get("preload_s", 0.0) + 5.0
    return burst_s


def run_bursts(run: Run, stack: ScaleoutStack, models: list[str], burst_models: list[str], burst_s: float) -> None:
    """Burst on a cold model with prefetch on, then off (fresh schedulers each time), on the running workers."""
    args, budget = run.args, run.budget
    runs = [(rep, on) for rep in range(args.burst_repeats) for on in (True, False)]
    measured_on: set[int] = set()
    for i, (rep, prefetch) in enumerate(runs):
        what = f"burst repeat {rep} prefetch {'on' if prefetch else 'off'}"
        if not stack.workers:
            run.skip(what, "no workers running (the scaling points failed or were skipped)")
            continue
        if not prefetch and rep not in measured_on:
            run.skip(what, "its prefetch-on run did not run: nothing to compare with")
            continue
        need = burst_s * (2 if prefetch else 1) + RESERVE_S  # an "on" run is worth it only with its "off" run
        if budget.left() < need:
            run.skip(what, f"{budget.left():.0f}s left, about {need:.0f}s needed (with the reserve)")
            continue
        stack.start_schedulers(args.num_schedulers, prefetch=prefetch)
        try:
            row, burst = burst_run(stack, args, models, burst_models[i], prefetch, rep, budget, len(runs) - i)
        except RuntimeError as exc:
            run.skip(what, f"failed: {str(exc)[-1500:]}")
            continue
        run.add(row, burst, {"phase": "burst", "prefetch": row["prefetch"], "repeat": rep})
        if prefetch:
            measured_on.add(rep)
        budget.say(f"{what}: burst of {row['burst_size']} on {row['model']}: ttft p90 {row['ttft_p90_ms']:.0f} ms "
                   f"(p50 {row['ttft_p50_ms']:.0f}), warm hits {row['warm_hit_fraction']:.2f}, prefetches "
                   f"{row['prefetches_started']}, tiers {row['burst_tiers']}, failed {row['burst_num_failed']}")


def run_all(run: Run, work: Path) -> None:
    args = run.args
    num_burst_runs = 2 * args.burst_repeats if args.burst_size else 0
    base_dir, names, stack = prepare(run, work, args.num_models + num_burst_runs + 1)
    models, burst_models, warm_model = names[:args.num_models], names[args.num_models:-1], names[-1]
    try:
        burst_s = run_scaling(run, stack, base_dir, models, warm_model, num_burst_runs)
        if num_burst_runs:
            run_bursts(run, stack, models, burst_models, burst_s)
        run.payload["complete"] = not run.payload["skipped"]
    finally:
        if args.logs_out:
            write_log_tails(work / "logs", args.logs_out / f"{run.path.stem if run.path else 'scaleout'}-logs.txt")
        stack.close()


def write_log_tails(log_dir: Path, path: Path, num_chars: int = 6000) -> None:
    """The end of every service log of the run, one file (for a run on a machine that is gone afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"==== {log.name} ====\n{log.read_text(errors='replace')[-num_chars:]}" for log in sorted(log_dir.glob("*.log"))]
    path.write_text("\n".join(parts)[-(8 << 20):])


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: finally blocks stop the services
    run = Run(args, budget)
    budget.say(f"scale-out on {run.device}: workers {args.workers}, {args.num_models} models, "
                f"{args.num_requests} requests{' per worker' if args.requests_per_worker else ''} at {args.rate_rps} req/s, "
                f"budget {args.budget_s or 'none'}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dz-scaleout-"))
    try:
        run_all(run, work)
    except BaseException as exc:
        run.payload["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
        raise
    finally:
        path = run.save()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
