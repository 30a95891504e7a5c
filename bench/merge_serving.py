"""Merge a serving matrix (scripts/bench_gpu_matrix.sh) into one JSON, one PNG and one summary table.

Every job of the matrix is one bench/serve.py run for one (num_models, bits) on one GPU: all modes and the base-only
reference on the same workload in the same process, so every ratio below is taken inside one job's own run.

    python -m bench.merge_serving bench/results/serving-matrix-jobs --out bench/results
    python -m bench.merge_serving --combine A.json B.json ... --out bench/results --label LABEL
(--combine: one matrix from several merged ones, e.g. one device call per job when a call has too few GPUs.)
Writes <out>/serving-matrix-<device>-<date>.json ({bench, device, commit, date, config, jobs, rows, summary, goals};
rows carry `job` and `gpu`) and its .png (throughput vs number of fine-tunes per mode and bits, and delta / swap).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from bench.results_io import git_commit, slug, write_results

MODE_KEYS = {"base": "base", "delta": "delta", "dense-delta": "dense", "swap": "swap"}  # summary column prefixes
JOB_KEYS = ("num_models", "bits", "label", "budget_s", "work_dir", "port_range", "note")  # differ between jobs


def load_jobs(jobs_dir: Path) -> list[tuple[dict, dict | None]]:
    """(job record, its serve.py result or None) for every <label>.job.json the runner wrote, by models and bits."""
    jobs = []
    for record_path in jobs_dir.glob("*.job.json"):
        record = json.loads(record_path.read_text())
        results = sorted(jobs_dir.glob(f"serving-{slug(record['label'])}-????-??-??.json"))
        record["result"] = results[-1].name if results else None
        jobs.append((record, json.loads(results[-1].read_text()) if results else None))
    return sorted(jobs, key=lambda job: (job[0]["num_models"], job[0]["bits"], job[0]["label"]))


def job_status(record: dict) -> str:
    """How a job ended, from the runner's record (rc of its `timeout`-wrapped run)."""
    rc = record.get("rc")
    if record.get("skipped"):
        return f"not started: {record['skipped']}"
    if rc is None:
        return "no end recorded (the runner itself was stopped)"
    ends = {0: "done", 124: "hard-stopped at its time limit", 137: "killed at its time limit",
            130: "stopped by the runner at the matrix budget"}
    return ends.get(rc, f"failed (rc {rc})")


def merged_rows(jobs: list[tuple[dict, dict | None]]) -> list[dict]:
    """Every job's rows, each with the job's label, GPU, num_models and bits (base rows have neither of their own)."""
    rows = []
    for record, data in jobs:
        host_gib = host_cache_gib(data.get("config", {})) if data else None
        for row in data["rows"] if data else []:
            rows.append({**row, "job": record["label"], "gpu": record["gpu"], "job_num_models": record["num_models"],
                         "job_bits": record["bits"], "host_cache_gib": host_gib})
    return rows


def host_cache_gib(config: dict) -> float | None:
    """The workers' host cache in GiB from a job's serve.py config (the last --host-cache-bytes flag wins)."""
    flags = [f for f in config.get("worker_flag") or [] if f.startswith("--host-cache-bytes=")]
    return int(flags[-1].split("=", 1)[1]) / (1 << 30) if flags else None


def summary_table(rows: list[dict]) -> list[dict]:
    """Per (num_models, bits, load): each mode's throughput and SLO attainment, and delta's ratios, one job each."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["job_num_models"], r["job_bits"], r["load"], r["job"]), {})[r["mode"]] = r
    table = []
    for (num_models, bits, load, job), by_mode in sorted(groups.items()):
        delta, any_row = by_mode.get("delta", {}), next(iter(by_mode.values()))
        entry = {"num_models": num_models, "bits": bits, "load": load, "job": job, "gpu": any_row["gpu"],
                 "rate_rps": any_row["rate_rps"], "host_cache_gib": any_row.get("host_cache_gib")}
        for mode, key in MODE_KEYS.items():
            entry[f"{key}_rps"] = by_mode[mode]["throughput_rps"] if mode in by_mode else None
        entry["delta_vs_swap"] = delta.get("throughput_vs_swap")
        entry["delta_vs_dense"] = delta.get("throughput_vs_dense")
        entry["delta_ttft_p90_vs_base"] = delta.get("ttft_p90_vs_base")
        for mode in ("delta", "dense-delta", "swap"):
            entry[f"slo_{MODE_KEYS[mode]}"] = by_mode.get(mode, {}).get("slo_attainment")
        baselines = [entry[k] for k in ("slo_dense", "slo_swap") if entry[k] is not None]
        entry["delta_slo_at_least_baselines"] = (None if entry["slo_delta"] is None or not baselines
                                                 else all(entry["slo_delta"] >= b for b in baselines))
        table.append(entry)
    return table


def matrix_goals(table: list[dict], num_models: int = 32) -> dict:
    """The issue's goals read off the table: delta >= 15x swap at `num_models`, TTFT p90 <= 2x base, delta's SLO
    attainment at least each baseline's, counted over the points where both sides were measured."""
    def count(key: str, met) -> dict:
        measured = [e for e in table if e[key] is not None]
        return {"met": sum(bool(met(e[key])) for e in measured), "measured": len(measured), "points": len(table)}

    def key(e: dict) -> str:  # jobs of one (models, bits) differ by their host budget, when one is set per job
        host = f"-host{e['host_cache_gib']:g}GiB" if len(hosts) > 1 and e["host_cache_gib"] is not None else ""
        return f"{e['bits']}bit-load{e['load']:g}{host}"

    hosts = {e["host_cache_gib"] for e in table if e["num_models"] == num_models}
    vs_swap = {key(e): e["delta_vs_swap"] for e in table
               if e["num_models"] == num_models and e["delta_vs_swap"] is not None}
    return {"throughput_vs_swap_at_32": vs_swap,
            "throughput_vs_swap_15x_at_32": {k: v >= 15 for k, v in vs_swap.items()},
            "ttft_p90_within_2x_base": count("delta_ttft_p90_vs_base", lambda v: v <= 2.0),
            "slo_at_least_both_baselines": count("delta_slo_at_least_baselines", lambda v: v)}


def format_table(table: list[dict]) -> str:
    """The summary as aligned text (req/s, ratios, SLO attainment; '-' = not measured)."""
    cols = [("models", "num_models", "{}"), ("bits", "bits", "{}"), ("host", "host_cache_gib", "{:g}G"),
            ("load", "load", "{:g}"),
            ("rate", "rate_rps", "{:.1f}"), ("base", "base_rps", "{:.2f}"), ("delta", "delta_rps", "{:.2f}"),
            ("dense", "dense_rps", "{:.2f}"), ("swap", "swap_rps", "{:.2f}"), ("d/swap", "delta_vs_swap", "{:.1f}x"),
            ("d/dense", "delta_vs_dense", "{:.1f}x"), ("ttft90 d/base", "delta_ttft_p90_vs_base", "{:.2f}x"),
            ("slo delta", "slo_delta", "{:.2f}"), ("slo dense", "slo_dense", "{:.2f}"),
            ("slo swap", "slo_swap", "{:.2f}"), ("gpu", "gpu", "{}")]
    cells = [[title for title, _, _ in cols]]
    cells += [["-" if e.get(key) is None else fmt.format(e[key]) for _, key, fmt in cols] for e in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def job_entry(record: dict, data: dict | None) -> dict:
    """What the merged JSON keeps of one job: its record, how it ended, and its run's own summaries."""
    entry = {**record, "status": job_status(record)}
    if data:
        entry.update({k: data.get(k) for k in ("device", "commit", "calibration", "goals", "warmups", "skipped",
                                                "over_budget", "timeline")})
    return entry


def merge(jobs_dir: Path, out_dir: Path, label: str = "") -> Path:
    """Write the merged JSON (and its PNG when matplotlib is there); print the summary table."""
    jobs = load_jobs(jobs_dir)
    if not jobs:
        raise SystemExit(f"no job records (*.job.json) in {jobs_dir}: did the matrix runner start any job?")
    done = [data for _, data in jobs if data]
    commits = sorted({data["commit"] for data in done}) or [git_commit()]
    config = {k: v for k, v in (done[0]["config"] if done else {}).items() if k not in JOB_KEYS}
    device = done[0]["device"] if done else "unknown"
    return _write(out_dir, label, device, commits, config, [job_entry(record, data) for record, data in jobs],
                  merged_rows(jobs))


def combine(paths: list[Path], out_dir: Path, label: str = "") -> Path:
    """One matrix from several merged ones (`merge`'s JSONs; e.g. one device call per job when a call's GPUs are
    too few for the matrix): their jobs and rows side by side, the summary and goals recomputed, `combined_from`
    naming the files. Every ratio stays inside its own job's run. Refused: files from different devices, and a
    job label in more than one file."""
    merged = [json.loads(path.read_text()) for path in paths]
    devices = sorted({m["device"] for m in merged})
    if len(devices) > 1:
        raise SystemExit(f"the files come from different devices ({', '.join(devices)}): combine one kind at a time")
    labels = [job["label"] for m in merged for job in m["jobs"]]
    twice = sorted({label_ for label_ in labels if labels.count(label_) > 1})
    if twice:
        raise SystemExit(f"job {', '.join(twice)} is in more than one file: keep one run per job")
    config = {**merged[0]["config"], "combined_from": [path.name for path in paths]}
    commits = sorted({commit for m in merged for commit in m["commit"].split(",")})
    jobs = sorted((job for m in merged for job in m["jobs"]), key=lambda j: (j["num_models"], j["bits"], j["label"]))
    return _write(out_dir, label, devices[0], commits, config, jobs, [row for m in merged for row in m["rows"]])


def _write(out_dir: Path, label: str, device: str, commits: list[str], config: dict, jobs: list[dict],
           rows: list[dict]) -> Path:
    """Write a merged matrix (summary and goals from `rows`) and its PNG; print the table, goals and job ends."""
    table = summary_table(rows)
    config = {**config, "jobs": [f"{j['num_models']}x{j['bits']}bit@gpu{j['gpu']}" for j in jobs]}
    payload = {"bench": "serving", "kind": "matrix", "device": device, "commit": ",".join(commits),
               "date": datetime.date.today().isoformat(), "config": config, "jobs": jobs, "rows": rows,
               "summary": table, "goals": matrix_goals(table)}
    path = write_results(out_dir, "serving", f"matrix-{label or device}", payload)
    print(format_table(table))
    print(json.dumps(payload["goals"]))
    for entry in payload["jobs"]:
        print(f"job {entry['label']} on gpu {entry['gpu']}: {entry['status']}, {len(entry.get('over_budget') or [])} "
              f"point(s) over budget, {len(entry.get('skipped') or [])} mode run(s) skipped")
    try:
        print(plot_matrix(path))
    except ImportError:
        print(f"plot skipped (no matplotlib): python -m bench.merge_serving --plot {path}")
    return path


def plot_matrix(path: Path) -> Path:
    """<json stem>.png: throughput vs number of fine-tunes per mode and bits, one panel per load, and delta / swap."""
    from matplotlib.ticker import ScalarFormatter

    from bench.plot_serving import finish, plot_series, plt

    data = json.loads(path.read_text())
    rows = [{**r, "bits": r["job_bits"]} if r["mode"] == "base" else r for r in data["rows"]]  # base of which jobs
    loads = sorted({r["load"] for r in rows})
    counts = sorted({r["job_num_models"] for r in rows})
    fig, axes = plt.subplots(1, len(loads) + 1, figsize=(6 * (len(loads) + 1), 4.8), squeeze=False)
    for ax, load in zip(axes[0], loads):
        plot_series(ax, rows, "job_num_models", "throughput_rps", lambda r, load=load: r["load"] == load)
        ax.set(xlabel="number of fine-tunes", ylabel="throughput (req/s)", title=f"throughput, load {load:g}")
    ratio_ax = axes[0][-1]
    for bits in sorted({r["job_bits"] for r in rows}):
        for load in loads:
            points = sorted((r["job_num_models"], r["throughput_vs_swap"]) for r in rows if r["mode"] == "delta"
                            and r["job_bits"] == bits and r["load"] == load and r.get("throughput_vs_swap"))
            if points:
                ratio_ax.plot(*zip(*points), marker="o", linestyle=":" if bits == 2 else "-",
                              label=f"{bits}-bit, load {load:g}")
    ratio_ax.axhline(15.0, color="black", linewidth=0.8, linestyle="--", label="goal: 15x")
    ratio_ax.set(yscale="log", xlabel="number of fine-tunes", ylabel="delta / swap throughput",
                 title="delta vs swap (same job)")
    ratio_ax.yaxis.set_major_formatter(ScalarFormatter())
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
    return finish(fig, axes[0], f"DeltaZip serving matrix on {data['device']} ({data['date']}, {data['commit']}), "
                  f"{len(data['jobs'])} jobs, one GPU each", path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.merge_serving", description=__doc__.splitlines()[0])
    p.add_argument("jobs_dir", type=Path, nargs="?", help="the runner's jobs folder (*.job.json + serving-*.json)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", default="", help="file label instead of the device name")
    p.add_argument("--plot", type=Path, help="only redraw the PNG of a merged JSON")
    p.add_argument("--combine", type=Path, nargs="+", metavar="MERGED", help="merged JSONs (one device kind) to "
                   "combine into one matrix, e.g. one device call per job")
    args = p.parse_args(argv)
    if args.plot:
        print(plot_matrix(args.plot))
    elif args.combine:
        print(f"wrote {combine(args.combine, args.out, args.label)}")
    elif args.jobs_dir:
        print(f"wrote {merge(args.jobs_dir, args.out, args.label)}")
    else:
        p.error("give the jobs folder (or --combine MERGED.json ..., or --plot MERGED.json)")


if __name__ == "__main__":
    main()
