"""Plot a bench/sbmm.py result: fraction of the HBM copy limit and speedup over bmm, per shape and bits.

  python bench/plot_sbmm.py bench/results/sbmm-<device>-<date>.json   # writes the .png beside it
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# (bits, layout, line style) per curve; a result holds those its --variants named (bench/sbmm.py)
LINES = ((4, "tiled4", "-"), (4, "sp4", (0, (5, 1, 1, 1))), (4, "canonical", "-."), (2, "dense2", "--"),
         (2, "sp2", (0, (3, 1, 1, 1, 1, 1))), (2, "canonical", ":"))
LAYOUT_LABELS = {"tiled4": "2:4 tile-major", "sp4": "2:4 sparse MMA", "sp2": "2:4 sparse MMA", "canonical": "2:4",
                 "dense2": "dense2"}


def plot(path: Path) -> Path:
    """Two rows of panels (fraction of limit, speedup vs bmm), one column per shape; lines per bits x rows."""
    result = json.loads(path.read_text())
    rows = result["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for col, shape in enumerate(shapes):
        for bits, layout, style in LINES:
            for rows_per, color in ((1, "tab:blue"), (4, "tab:orange"), (16, "tab:green")):
                pts = sorted(((r["num_deltas"], r) for r in rows
                              if r["shape"] == shape and r["bits"] == bits and r["rows_per_delta"] == rows_per
                              and r.get("layout", "canonical") == layout), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                label = f"{bits}-bit {LAYOUT_LABELS[layout]}, {rows_per} rows/delta"
                marker = "o" if bits == 4 else "s"  # the sparse-MMA orders share a dash pattern: tell widths apart
                axes[0][col].plot(xs, [r["fraction_of_limit"] for _, r in pts], linestyle=style, color=color,
                                  marker=marker, label=label)
                axes[1][col].plot(xs, [r["speedup_vs_bmm"] for _, r in pts], linestyle=style, color=color,
                                  marker=marker, label=label)
        n, k = next((r["n"], r["k"]) for r in rows if r["shape"] == shape)
        axes[0][col].set_title(f"{shape} (N={n}, K={k})")
        axes[0][col].axhline(0.7, color="grey", lw=0.8)
        axes[1][col].axhline(4, color="grey", lw=0.8)
        axes[1][col].axhline(6, color="grey", lw=0.8, ls="--")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("distinct deltas in the batch")
            ax.grid(alpha=0.3)
        axes[0][col].set_ylabel("fraction of copy limit")
        axes[1][col].set_ylabel("speedup vs torch.bmm (dense fp16)")
    axes[0][0].legend(fontsize=8)
    limit = result["config"]["copy_limit_gbps"]
    fig.suptitle(f"SBMM on {result['device']} ({result['date']}, {result['commit'][:8]}), copy limit {limit:.0f} GB/s")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
