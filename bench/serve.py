"""Serving benchmark driver: replay a many-model workload through the SDK, open-loop, against each worker mode.

Starts redis + delta store + scheduler (deltazip.stack), pushes synthetic deltas (bench/synthetic.py), then per
worker mode (`delta`, `dense-delta`, `swap`) starts one worker and replays, for every number of models and load,
the same requests; a base-only run of the same requests is the SLO reference (SLO: e2e <= k x base e2e of the
same request). `--target ADDR` replays against a running scheduler instead (one mode, named by --modes).
`--schedulers N` starts N schedulers and `--client-procs M` replays from M processes spread over them
(bench/split_replay.py), so neither one scheduler's event loop nor one client process caps the stack.
`--warmup-prefetch` warms every point set to the strongest tier its mode keeps first (bench/warm.py).

    python -m bench.serve --shape tiny --num-models 2 --modes delta --num-requests 20 --device cpu   # smoke
    scripts/bench_gpu.sh                                                                            # the GPU run
    scripts/bench_gpu_matrix.sh                                      # one run per (num_models, bits) per GPU
Writes bench/results/serving-<device>-<date>.json ({bench, device, commit, date, config, rows, latencies}, and
calibration, warmups, warm_tiers, skipped, over_budget, timeline).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.replay import add_ratios, goal_summary
from bench.results_io import device_name, git_commit, host_info, write_results
from bench.run_budget import RunBudget
from bench.serve_points import calibrate_rate, mark, run_mode
from bench.serve_stack import PUSH_PARALLEL, Stack
from bench.warm import WARM_TIERS, TierBudget, warm_residency
from deltazip.rpc.ports import PortRange

MODES = ("delta", "dense-delta", "swap")
# A mode variant, KIND+LABEL (e.g. delta+md8): a worker of mode KIND with KIND's flags and its own --mode-flag
# KIND+LABEL=FLAG ones after them, its rows named KIND+LABEL. It runs in the same job as KIND, against the same base
# reference, so an A/B of a worker flag shares the host, the GPU and the deltas (cells on different GPUs or hosts
# differed by more than the flags they compared: docs/serving.md, sessions 29-30). The goals read the plain modes.
# The base reference and the rate calibration run on the first listed mode's worker: list a variant first only when
# its flags leave base-only serving alone.
VARIANT_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def mode_kind(mode: str) -> str:
    """The worker mode of a mode or variant: 'delta+md8' -> 'delta'."""
    return mode.partition("+")[0]


def check_mode(mode: str) -> str | None:
    """Why `mode` is not a mode or KIND+LABEL variant of one (None: it is)."""
    kind, plus, label = mode.partition("+")
    if kind not in MODES:
        return f"{mode!r}: the mode must be one of {MODES} (or MODE+LABEL)"
    if plus and not VARIANT_LABEL.fullmatch(label):
        return f"{mode!r}: a variant's label takes letters, digits, '_', '.' and '-'"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--target", help="scheduler address(es) of a running stack, comma list (its models ft-000..; no stack started)")
    p.add_argument("--base-model", default="", help="with --target: the base model's name, for the SLO reference")
    p.add_argument("--target-models", type=lambda s: s.split(","), default=[],
                   help="with --target: the fine-tunes to use, most popular first (default ft-000, ft-001, ...)")
    p.add_argument("--worker-address", help="with --target: a worker to sample queue depth from (optional)")
    p.add_argument("--shape", choices=("tiny", "7b", "13b"), default="tiny")
    p.add_argument("--num-layers", type=int, default=0, help="cut the synthetic model's depth (0 = full)")
    p.add_argument("--num-models", type=ints, default=[2], help="comma list, e.g. 8,16,32,64")
    p.add_argument("--bits", type=ints, default=[4], help="comma list of delta bits (2 and/or 4), 2:4 sparse")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--modes", type=lambda s: s.split(","), default=["delta"],
                   help=f"comma list of {MODES}, or a variant MODE+LABEL with its own --mode-flag MODE+LABEL=FLAG "
                        "(an A/B of a worker flag in one job, e.g. delta,delta+md8)")
    p.add_argument("--rate-rps", type=float, default=2.0,
                   help="mean arrival rate at load 1; 0 = calibrate: --auto-fraction x the measured base capacity")
    p.add_argument("--auto-fraction", type=float, default=0.5,
                   help="with --rate-rps 0: load 1 offers this share of the base-only capacity")
    p.add_argument("--calibration-bursts", type=int, default=2,
                   help="with --rate-rps 0: base bursts to send; the last one sets the rate (the first also warms "
                        "the worker: new batch shapes, caches)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip the points (and modes) left once this many seconds have passed (0 = no budget); "
                        "results are written after every point either way")
    p.add_argument("--mode-reserve-s", type=float, default=0.0,
                   help="with --budget-s: a mode's second and later points start only while this many seconds per "
                        "mode still to start remain, so every mode gets its first point (0 = off)")
    p.add_argument("--loads", type=floats, default=[1.0], help="comma list of multipliers of --rate-rps")
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="gamma")
    p.add_argument("--cv", type=float, default=2.0)
    p.add_argument("--zipf-alpha", type=float, default=1.5)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--trace", type=Path, help="replay this JSON-lines trace instead of generating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-k", type=float, default=5.0, help="SLO: e2e <= k x base-only e2e of the same request")
    p.add_argument("--device", default="cpu", help="worker device: cpu | cuda")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--worker-flag", action="append", default=[], help="extra worker flag, e.g. --worker-flag=--num-kv-blocks=512")
    p.add_argument("--mode-flag", action="append", default=[],
                   help="worker flag for one mode only, MODE=FLAG, e.g. --mode-flag swap=--num-device-slots=1; a "
                        "variant MODE+LABEL takes MODE's and then its own")
    p.add_argument("--drop-local-copies", action="store_true",
                   help="delete the synthetic deltas once pushed (the store keeps them): saves disk on big shapes")
    p.add_argument("--write-jobs", type=int, default=1,
                   help="synthetic deltas written at a time, in child processes (bench/synthetic.py --jobs)")
    p.add_argument("--link-worker-cache", action="store_true",
                   help="with --keep-disk-cache: put each pushed delta into the workers' disk cache as hard links to "
                        "the store's files, as if fetched before the run (one copy on disk: full-depth shapes fit)")
    p.add_argument("--dense-artifacts", action="store_true",
                   help="serve dense-delta mode from uncompressed fp16 delta artifacts (default: the packed ones)")
    p.add_argument("--schedulers", type=int, default=1,
                   help="scheduler processes to start; client processes spread over them round-robin")
    p.add_argument("--client-procs", type=int, default=1,
                   help="processes replaying the workload (one asyncio client each), so the driver is not the "
                        "bottleneck; 1 = replay in this process")
    p.add_argument("--stream-chunk-tokens", type=int, default=0,
                   help="worker --stream-chunk-tokens (tokens per stream chunk; 1 = one message per token); "
                        "0 = the worker's default")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="replay the first N requests of each mode x num_models workload, unrecorded, before its "
                        "points (steady state: deltas resident, kernels built); 0 = every point starts cold")
    p.add_argument("--warmup-timeout-s", type=float, default=0.0,
                   help="deadline of a warm-up request (0 = --timeout-s): caps how long a slow mode's warm-up runs")
    p.add_argument("--warmup-settle-s", type=float, default=120.0,
                   help="after a point set's warm-up, wait up to this long (also bounded by --budget-s) until the "
                        "worker reports no kernel warm-up left (Status.kernels_warming; it builds kernels while "
                        "idle), so no point carries compiles; 0 = do not wait")
    p.add_argument("--warmup-prefetch", action="store_true",
                   help="before each mode x num_models warm-up, prefetch every fine-tune of the set through the "
                        "SDK into the strongest tier its mode keeps, most popular first, as far as the worker's "
                        "budgets hold them: delta and dense-delta to GPU slots, then host; swap to the pinned host "
                        "cache as merged models (swap's device tier holds no bytes, it only marks the model to swap "
                        "in next). The JSON's warm_tiers names each mode's tiers, warmups what each set reached")
    p.add_argument("--warmup-prefetch-timeout-s", type=float, default=300.0,
                   help="longest a point set's prefetch may take (also bounded by --budget-s)")
    p.add_argument("--keep-disk-cache", action="store_true",
                   help="one worker disk cache for all modes: a later mode starts with the deltas an earlier one "
                        "fetched on local disk (default: each mode's cache starts empty; full-depth 7B deltas of "
                        "several modes would fill a disk)")
    p.add_argument("--port-range", default="",
                   help="FIRST-LAST: ports of this run's processes (runs side by side get disjoint ranges); "
                        "default: free ports picked by the OS")
    p.add_argument("--work-dir", type=Path, help="models, store and logs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", default="", help="file label instead of the device name, e.g. cpu-smoke")
    p.add_argument("--note", default="", help="a sentence stored in the JSON (what this run is and is not)")
    args = p.parse_args(argv)
    bad = [why for why in map(check_mode, args.modes) if why]
    if bad:
        p.error(f"unknown mode(s): {'; '.join(bad)}")
    if len(set(args.modes)) < len(args.modes):
        p.error(f"--modes names a mode twice: {','.join(args.modes)}")
    try:
        for mode in args.modes:
            mode_flags(args.mode_flag, mode)
    except ValueError as exc:
        p.error(str(exc))
    stray = sorted({spec.partition("=")[0] for spec in args.mode_flag if "+" in spec.partition("=")[0]}
                   - set(args.modes))
    if stray:  # a typo in a variant's name would run the A/B with no difference
        p.error(f"--mode-flag names variant(s) {', '.join(stray)} that --modes does not run ({','.join(args.modes)})")
    if args.schedulers < 1 or args.client_procs < 1 or args.stream_chunk_tokens < 0:
        p.error("--schedulers and --client-procs must be >= 1, --stream-chunk-tokens >= 0")
    if args.target and args.schedulers > 1:
        p.error("--schedulers starts schedulers; with --target, list a running stack's schedulers in --target A,B")
    if args.write_jobs < 1:
        p.error(f"--write-jobs must be >= 1, got {args.write_jobs}")
    if args.link_worker_cache and not args.keep_disk_cache:
        p.error("--link-worker-cache fills the disk cache the workers share: it needs --keep-disk-cache")
    if args.target and args.warmup_prefetch:
        p.error("--warmup-prefetch sizes the warm state from the worker's flags: it needs the stack started here")
    try:
        args.ports = PortRange.parse(args.port_range) if args.port_range else None
    except ValueError as exc:
        p.error(str(exc))
    return args


def mode_flags(specs: list[str], mode: str) -> list[str]:
    """The --mode-flag values (MODE=FLAG) for `mode`: a variant KIND+LABEL gets KIND's, then its own (so its own
    win where a flag is given twice)."""
    own, kind_flags = [], []
    for spec in specs:
        name, sep, flag = spec.partition("=")
        if not sep or check_mode(name):
            raise ValueError(f"--mode-flag wants MODE=FLAG with MODE one of {MODES} or MODE+LABEL, got {spec!r}")
        if name == mode:
            own.append(flag)
        elif name == mode_kind(mode):
            kind_flags.append(flag)
    return kind_flags + own


def make_and_push(stack: Stack, args, kind: str, bits: int) -> tuple[Path, list[str]]:
    """Synthetic deltas for the largest model count, pushed under '<name>-<bits>b' (or '<name>-dense').

    Each delta is pushed as soon as it is written (--write-jobs at a time), then, with --link-worker-cache, hard-linked
    from the store into the kept worker disk cache, and with --drop-local-copies its local copy is removed: the disk
    holds about one copy of the deltas at any time."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.synthetic import write_suite

    suffix = f"{bits}b" if kind == "sparse24" else "dense"
    stored = stack.stored_names()

    def publish(name: str, path: Path) -> None:
        if name not in stored:
            stack.push_one(name, path)
        if args.link_worker_cache:
            stack.link_into_cache(name)
        if args.drop_local_copies:
            shutil.rmtree(path)

    with ThreadPoolExecutor(max_workers=PUSH_PARALLEL) as pool:
        pending = []
        base_dir, artifacts = write_suite(
            stack.work / "models", args.shape, max(args.num_models), kind=kind, bits=bits, group_size=args.group_size,
            num_layers=args.num_layers, device=args.device if args.device.startswith("cuda") else "cpu",
            jobs=args.write_jobs,
            on_written=lambda name, path: pending.append(pool.submit(publish, f"{name}-{suffix}", path)))
        for future in pending:
            future.result()  # the first failed push raises here
    return base_dir, [f"{name}-{suffix}" for name in artifacts]


def prefetcher(stack: Stack, worker, base_dir: Path, mode: str, args) -> Callable[[list[str]], dict] | None:
    """--warmup-prefetch: a function that warms a point set's fine-tunes on this mode's worker (bench/warm.py)."""
    if not args.warmup_prefetch:
        return None
    budget = TierBudget.of_worker(str(base_dir), [*stack.worker_flags, *mode_flags(args.mode_flag, mode)])

    def prefetch(names: list[str]) -> dict:
        timeout_s = max(1.0, min(args.warmup_prefetch_timeout_s, args.budget.remaining_s()))
        return asyncio.run(warm_residency(stack.scheduler.address, worker.address, mode_kind(mode), names, budget,
                                          timeout_s))

    return prefetch


def run_local(args, rows: list, latencies: list, skipped: list) -> None:
    """Start the stack; per bits: make and push the deltas, then per mode: one worker, all points."""
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dz-bench-"))
    flags = ["--device", args.device, "--dtype", args.dtype, *args.worker_flag]
    if args.stream_chunk_tokens:
        flags += ["--stream-chunk-tokens", str(args.stream_chunk_tokens)]
    stack = Stack(work, flags, args.schedulers, args.keep_disk_cache, args.ports)
    address = ",".join(p.address for p in stack.schedulers)
    base_runs: dict = {}  # load -> {request id: Outcome}: one base-only reference for every bits and mode
    runs = [(bits, mode) for bits in args.bits for mode in args.modes]
    mark(args, "stack started")
    try:
        for bits in args.bits:
            if args.budget.remaining_s() <= 0:
                skipped += [{"mode": m, "bits": bits, "why": "budget spent before it started"} for m in args.modes]
                continue
            base_dir, names = make_and_push(stack, args, "sparse24", bits)
            mark(args, "deltas pushed", bits=bits, num_models=len(names))
            for mode in args.modes:
                args.budget.modes_after = len(runs) - runs.index((bits, mode)) - 1
                why = args.budget.why_skip_mode()
                if why:
                    skipped.append({"mode": mode, "bits": bits, "why": why})
                    print(f"mode {mode} skipped: {why}", flush=True)
                    continue
                mode_names = names
                if mode_kind(mode) == "dense-delta" and args.dense_artifacts:
                    mode_names = make_and_push(stack, args, "dense", bits)[1]
                try:
                    worker = stack.start_worker(base_dir, mode_kind(mode), mode_flags(args.mode_flag, mode))
                except RuntimeError as exc:  # e.g. a mode this worker build lacks: the other modes still run
                    skipped.append({"mode": mode, "bits": bits, "why": str(exc)[-600:]})
                    print(f"mode {mode} skipped: worker did not start:\n{str(exc)[-600:]}", flush=True)
                    continue
                mark(args, "worker started", mode=mode, bits=bits)
                try:
                    if args.rate_rps <= 0:
                        calibrate_rate(address, base_dir.name, names, args)
                    run_mode(address, mode, bits, mode_names, base_dir.name, args, rows, latencies,
                             base_runs, worker.address, prefetcher(stack, worker, base_dir, mode, args))
                finally:
                    stack.stop_worker(worker)
    finally:
        stack.close()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    rows: list[dict] = []
    latencies: list[dict] = []
    skipped: list[dict] = []
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "ports"}
    args.budget = RunBudget(args.budget_s, args.mode_reserve_s)
    args.over_budget, args.calibration, args.warmups, args.timeline = [], None, [], []
    device = device_name(args.device)
    host = host_info()

    def save() -> Path:
        final = [dict(r) for r in rows]
        add_ratios(final)
        payload = {"bench": "serving", "device": device, "host": host, "commit": git_commit(), "note": args.note,
                   "date": datetime.date.today().isoformat(), "config": {**config, "rate_rps": args.rate_rps},
                   "calibration": args.calibration, "warm_tiers": WARM_TIERS if args.warmup_prefetch else None,
                   "warmups": args.warmups, "goals": goal_summary(final), "rows": final, "skipped": skipped,
                   "over_budget": args.over_budget, "timeline": args.timeline, "latencies": latencies}
        return write_results(args.out, "serving", args.label or device, payload)

    args.checkpoint = save
    if args.target:
        names = args.target_models or [f"ft-{i:03d}" for i in range(max(args.num_models))]
        if len(names) < max(args.num_models):
            raise SystemExit(f"--target-models names {len(names)} models, --num-models wants {max(args.num_models)}")
        run_mode(args.target, args.modes[0], None, names, args.base_model, args, rows, latencies, {},
                 args.worker_address)
    else:
        run_local(args, rows, latencies, skipped)
    path = save()
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
