"""Plots of a scale-out result JSON: throughput vs workers, burst TTFT with/without prefetch, store bytes/s, CPU.

    python -m bench.plot_scaleout bench/results/scaleout-<device>-<date>.json     # writes the .png beside it
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_scaling(ax, rows: list[dict]) -> None:
    styles = {"warm": ("tab:green", "-"), "cold": ("tab:blue", "--"), "resident": ("tab:purple", "-")}
    ks: set[int] = set()
    for cache, (color, line) in styles.items():
        scale = sorted((r for r in rows if r["phase"] == "scale" and r.get("pass", "cold") == cache),
                       key=lambda r: r["num_workers"])
        if not scale:
            continue
        ks |= {r["num_workers"] for r in scale}
        ax.plot([r["num_workers"] for r in scale], [r["throughput_rps"] for r in scale], marker="o", color=color,
                linestyle=line, label=f"{cache} caches")
        one = next((r for r in scale if r["num_workers"] == 1), None)
        if one:
            xs = [r["num_workers"] for r in scale]
            ax.plot(xs, [x * one["throughput_rps"] for x in xs], linestyle=":", color=color, alpha=0.6,
                    label=f"linear from K=1 ({cache})")
        for r in scale:
            ratio = r.get("scaling_vs_1")
            text = (f"{ratio:.2f}x" if ratio is not None else "") + ("" if r["saturated"] else " (load-bound)")
            ax.annotate(text, (r["num_workers"], r["throughput_rps"]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color=color)
    ax.set(xlabel="workers (K)", ylabel="throughput (req/s)", title="throughput vs workers (same run)")
    if ks:
        ax.set_xticks(sorted(ks))


def plot_burst(ax, latencies: list[dict]) -> None:
    colors = {"on": "tab:green", "off": "tab:red"}
    drawn = False
    for entry in latencies:
        if entry.get("phase") != "burst" or not entry["ttft_ms"]:
            continue
        values = entry["ttft_ms"]
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], color=colors[entry["prefetch"]],
                alpha=1.0 if entry.get("repeat", 0) == 0 else 0.5, label=f"prefetch {entry['prefetch']}")
        drawn = True
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of burst requests", title="burst on a cold model: TTFT CDF")
    if drawn:
        ax.set_xscale("log")
        ax.axhline(0.9, color="tab:gray", linewidth=0.5)


def plot_store(ax, rows: list[dict]) -> None:
    for r in rows:
        series = r.get("store_series") or []
        if len(series) < 2:
            continue
        label = (f"K={r['num_workers']} {r.get('pass', '')}" if r["phase"] == "scale"
                 else f"burst, prefetch {r['prefetch']}")
        ts, rates = [], []
        for (t0, *a), (t1, *b) in zip(series, series[1:]):
            if t1 > t0:
                ts.append(t1)
                rates.append(sum((y or 0) - (x or 0) for x, y in zip(a, b)) / (t1 - t0) / 1e6)
        ax.plot(ts, rates, label=label, linestyle="-" if r["phase"] == "scale" else "--")
    ax.set(xlabel="seconds into the run", ylabel="MB/s served (all stores)", title="delta stores: bytes served/s")


def plot_cpu(ax, rows: list[dict]) -> None:
    runs = [r for r in rows if r["phase"] in ("scale", "burst")]
    roles = ("cpu_client", "cpu_scheduler", "cpu_store", "cpu_worker")
    width = 0.8 / len(roles)
    for j, role in enumerate(roles):
        ax.bar([i + j * width for i in range(len(runs))], [max(r.get(role) or [0]) for r in runs], width,
               label=role.removeprefix("cpu_"))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))],
                  [f"K={r['num_workers']}\n{r.get('pass', '')}" if r["phase"] == "scale" else f"burst\n{r['prefetch']}"
                   for r in runs], fontsize=8)
    ax.set(ylabel="busiest service of the role, its processes summed (cores)", title="CPU: is something other than the workers the limit?")


def plot(path: Path) -> Path:
    """Write <json stem>.png with the four panels."""
    data = json.loads(path.read_text())
    rows = data["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    plot_scaling(axes[0][0], rows)
    plot_burst(axes[0][1], data.get("latencies", []))
    plot_store(axes[1][0], rows)
    plot_cpu(axes[1][1], rows)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    note = textwrap.fill(data.get("note", "").split(";")[0], 150)
    fig.suptitle(f"DeltaZip scale-out on {data['device']} ({data['date']}, {data['commit']})" + (f"\n{note}" if note else ""),
                 fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plot_scaleout", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+")
    for path in p.parse_args(argv).results:
        print(plot(path))


if __name__ == "__main__":
    main()
