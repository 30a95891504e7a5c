"""Plots of a serving result JSON: latency CDF, throughput vs number of models, SLO attainment vs load.

    python -m bench.plot_serving bench/results/serving-<device>-<date>.json     # writes the .png beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"delta": ("tab:green", "-"), "dense-delta": ("tab:orange", "--"), "swap": ("tab:red", ":"),
         "base": ("tab:gray", "-.")}


def label(entry: dict) -> str:
    """'swap 2-bit'; a base row carries bits only in a merged matrix: the base reference of those bits' jobs."""
    bits = entry.get("bits")
    if not bits:
        return entry["mode"]
    return f"base ({bits}-bit jobs)" if entry["mode"] == "base" else f"{entry['mode']} {bits}-bit"


# mode variants (bench/serve.py, MODE+LABEL): their kind's line, a color of their own in order of appearance
VARIANT_COLORS = ("tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_variant_color: dict[str, str] = {}  # this plot's variants so far (`plot` clears it)


def style(entry: dict) -> dict:
    kind, _, variant = entry["mode"].partition("+")
    color, line = STYLE.get(kind, ("tab:blue", "-"))
    if variant:
        color = _variant_color.setdefault(entry["mode"], VARIANT_COLORS[len(_variant_color) % len(VARIANT_COLORS)])
    return {"color": color, "linestyle": line if entry.get("bits") != 2 else (0, (1, 1)), "label": label(entry)}


def pick_num_models(rows: list[dict]) -> int:
    """The point the goals name (32 models) when present, else the largest measured."""
    counts = sorted({r["num_models"] for r in rows if r["num_models"]})
    return 32 if 32 in counts else (counts[-1] if counts else 0)


def plot_cdf(ax, latencies: list[dict], num_models: int, load: float) -> None:
    for entry in latencies:
        if entry["load"] != load or entry["num_models"] not in (0, num_models) or not entry["e2e_ms"]:
            continue
        values = entry["e2e_ms"]
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], **style(entry))
    ax.set(xscale="log", xlabel="end-to-end latency (ms)", ylabel="fraction of requests",
           title=f"latency CDF, {num_models} models, load {load:g}")


def plot_series(ax, rows: list[dict], x: str, y: str, where) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if where(r) and r.get(y) is not None:
            groups.setdefault((r["mode"], r.get("bits")), []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: r[x])
        ax.plot([r[x] for r in members], [r[y] for r in members], marker="o", **style(members[0]))


def plot(path: Path) -> Path:
    """Write <json stem>.png with the three panels."""
    data = json.loads(path.read_text())
    rows, latencies = data["rows"], data.get("latencies", [])
    _variant_color.clear()
    num_models = pick_num_models(rows)
    top_load = max(r["load"] for r in rows)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    plot_cdf(axes[0], latencies, num_models, top_load)
    plot_series(axes[1], rows, "num_models", "throughput_rps", lambda r: r["load"] == top_load and r["num_models"])
    axes[1].set(xscale="log", xlabel="number of fine-tunes", ylabel="throughput (req/s)",
                title=f"throughput vs models, load {top_load:g}")
    plot_series(axes[2], rows, "rate_rps", "slo_attainment", lambda r: r["num_models"] == num_models)
    axes[2].set(xlabel="offered load (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02),
                title=f"SLO attainment vs load, {num_models} models")
    note = data.get("note", "").split(";")[0]
    return finish(fig, axes, f"DeltaZip serving on {data['device']} ({data['date']}, {data['commit']})"
                  + (f"\n{note}" if note else ""), path.with_suffix(".png"))


def finish(fig, axes, title: str, out: Path) -> Path:
    """Grid and legend on every panel, the title, and the figure saved to `out` and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plot_serving", description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+")
    for path in p.parse_args(argv).results:
        print(plot(path))


if __name__ == "__main__":
    main()
