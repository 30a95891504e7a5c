"""Plot and README table of a quality result JSON: compression ratio vs kept share of the fine-tune's gain.

    python bench/plot_quality.py bench/results/quality-<device>-<date>.json [-o out.png] [--table]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FAMILIES = ("ΔCompress 2:4", "ΔCompress dense", "ΔCompress remedies", "magnitude+RTN 2:4", "BitDelta 1-bit",
            "SparseGPT 2:4 on W_ft")  # fmt: skip
FLOOR = -0.5  # kept gains below this are clipped in the plot (SparseGPT on W_ft can lose far more than the gain)
METRIC_NAMES = {"exact_match": "exact match", "neg_perplexity": "perplexity"}


def family(row: dict) -> str | None:
    """Which line of the plot a row belongs to (None for base / fine-tune)."""
    method = row["method"]
    if method == "obs":
        if row.get("target_ratio"):
            return "ΔCompress per-tensor allocation"
        if row.get("remedy"):
            return "ΔCompress remedies"
        return "ΔCompress 2:4" if row["sparsity"] == "2:4" else "ΔCompress dense"
    return {"magnitude_rtn": "magnitude+RTN 2:4", "bitdelta": "BitDelta 1-bit",
            "sparsegpt_full": "SparseGPT 2:4 on W_ft"}.get(method)  # fmt: skip


def series(rows: list[dict], ratio_key: str = "ratio") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{task: {family: [(ratio, kept_gain), ...] sorted by ratio}} over rows that have both."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        fam = family(r)
        if fam is None or r.get(ratio_key) is None or r.get("kept_gain") is None:
            continue
        out.setdefault(r["task"], {}).setdefault(fam, []).append((r[ratio_key], r["kept_gain"]))
    for fams in out.values():
        for points in fams.values():
            points.sort()
    return out


def _quality(row: dict) -> str:
    if row["metric"] == "neg_perplexity":
        return f"{row['perplexity']:.3f}"
    return f"{row['quality']:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table_markdown(doc: dict) -> str:
    """README table: one line per task and setting, with base and fine-tune quality in each task's header row."""
    lines = ["| task | setting | bits | sparsity | group | ratio | ratio (zstd) | quality | kept gain | kept gain (ppl) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        metric = METRIC_NAMES.get(r.get("metric"), r.get("metric"))
        if r["method"] == "base":
            continue
        if r["method"] == "finetune":
            extra = f" / next-line acc {r['next_line_accuracy']:.3f}" if "next_line_accuracy" in r else ""
            base = next((b for b in doc["rows"] if b["task"] == r["task"] and b["method"] == "base"), None)
            base_q = _quality(base) if base else "?"
            lines.append(f"| **{r['task']}** | base → fine-tune ({metric}) | 16 | – | – | 1.00x | – | "
                         f"{base_q} → {_quality(r)}{extra} | – | – |")  # fmt: skip
            continue
        group = "row" if r.get("group_size") is None else str(r["group_size"])
        sparsity = "dense" if r["sparsity"] in ("0", "none") else r["sparsity"]
        kept = _num(r.get("kept_gain"), ".1%")
        lines.append(f"| {r['task']} | {r['setting']} | {r['bits']} | {sparsity} | {group} | {r['ratio']:.2f}x | "
                     f"{_num(r.get('ratio_zstd'), '.2f')}x | {_quality(r)} | {kept} | "
                     f"{_num(r.get('kept_gain_ppl'), '.1%')} |")  # fmt: skip
    return "\n".join(lines)


def plot(doc: dict, out: Path) -> None:
    """One panel per task: ratio (x) vs kept gain (y), one line per method; zstd ratios dotted. Kept gains
    below FLOOR are drawn at FLOOR with their value written beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain, zstd = series(doc["rows"]), series(doc["rows"], "ratio_zstd")
    tasks = list(plain)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4.2), squeeze=False)
    colors = dict(zip(FAMILIES, ("tab:green", "tab:olive", "tab:cyan", "tab:orange", "tab:red", "tab:purple")))
    for ax, task in zip(axes[0], tasks):
        for fam in FAMILIES:
            for points, solid in ((plain[task].get(fam), True), (zstd.get(task, {}).get(fam), False)):
                if not points:
                    continue
                x, y = zip(*points)
                shown = [max(v, FLOOR) for v in y]
                ax.plot(x, shown, marker="o" if solid else ".", color=colors[fam], label=fam if solid else None,
                        linestyle=("-" if solid else ":") if len(x) > 1 else "none", alpha=1.0 if solid else 0.6)
                for xi, yi in zip(x, y):
                    if yi < FLOOR and solid:
                        ax.annotate(f"{yi:.2f}", (xi, FLOOR), fontsize=7, color=colors[fam], xytext=(3, 3),
                                    textcoords="offset points")
        ax.axhline(0.99, color="gray", linewidth=0.8, linestyle="--")
        ax.axhline(0.97, color="gray", linewidth=0.8, linestyle=":")
        top = max([1.0] + [y for points in plain[task].values() for _, y in points])
        ax.set_ylim(FLOOR - 0.05, top + 0.1)
        ax.set_title(task)
        ax.set_xlabel("ratio: fp16 fine-tune / shard bytes (dotted: zstd)")
        ax.set_ylabel("kept share of the fine-tune's gain")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"quality vs compression, {doc.get('device', '?')} {doc.get('date', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path)
    p.add_argument("-o", "--out", type=Path, help="PNG path (default: beside the JSON)")
    p.add_argument("--table", action="store_true", help="print the README table instead of plotting")
    args = p.parse_args()
    doc = json.loads(args.result.read_text())
    if args.table:
        print(table_markdown(doc))
        return
    out = args.out or args.result.with_suffix(".png")
    plot(doc, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
