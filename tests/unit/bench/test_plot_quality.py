"""bench/plot_quality.py: which line a row belongs to, the README table, the PNG; bench/quality.py --merge."""

import json

from bench.plot_quality import family, plot, series, table_markdown
from bench.quality import main as quality_main

ROWS = [
    {"task": "python", "setting": "base", "method": "base", "ratio": None, "quality": -6.36, "perplexity": 6.36,
     "metric": "neg_perplexity", "kept_gain": 0.0, "next_line_accuracy": 0.31},
    {"task": "python", "setting": "finetune", "method": "finetune", "ratio": 1.0, "quality": -4.04, "perplexity": 4.04,
     "metric": "neg_perplexity", "kept_gain": 1.0, "next_line_accuracy": 0.45},
    {"task": "python", "setting": "dz-2b-24-g96", "method": "obs", "bits": 2, "sparsity": "2:4", "group_size": 96,
     "ratio": 9.31, "ratio_zstd": 12.1, "quality": -4.05, "perplexity": 4.05, "metric": "neg_perplexity",
     "kept_gain": 0.9957, "kept_gain_ppl": 0.9957},
    {"task": "python", "setting": "dz-4b-24-g96", "method": "obs", "bits": 4, "sparsity": "2:4", "group_size": 96,
     "ratio": 6.1, "ratio_zstd": 7.0, "quality": -4.04, "perplexity": 4.04, "metric": "neg_perplexity",
     "kept_gain": 1.0, "kept_gain_ppl": 1.0},
    {"task": "python", "setting": "dz-2b-24-row", "method": "obs", "bits": 2, "sparsity": "2:4", "group_size": None,
     "remedy": "group size: one scale per row", "ratio": 10.1, "ratio_zstd": None, "quality": -4.1,
     "perplexity": 4.1, "metric": "neg_perplexity", "kept_gain": 0.974, "kept_gain_ppl": 0.974},
    {"task": "arith", "setting": "bitdelta-1b", "method": "bitdelta", "bits": 1, "sparsity": "0", "group_size": None,
     "ratio": 10.0, "ratio_zstd": 19.0, "quality": 0.5, "perplexity": 1.2, "metric": "exact_match",
     "kept_gain": 0.625, "kept_gain_ppl": 0.9},
]  # fmt: skip
DOC = {"bench": "quality", "device": "cpu", "date": "2026-11-26", "config": {}, "rows": ROWS}


def test_rows_map_to_method_lines():
    assert [family(r) for r in ROWS] == [None, None, "ΔCompress 2:4", "ΔCompress 2:4", "ΔCompress remedies",
                                         "BitDelta 1-bit"]  # fmt: skip
    s = series(ROWS)
    assert s["python"]["ΔCompress 2:4"] == [(6.1, 1.0), (9.31, 0.9957)]  # sorted by ratio
    assert "ΔCompress remedies" not in series(ROWS, "ratio_zstd")["python"]  # no zstd ratio measured


def test_table_has_reference_and_settings():
    table = table_markdown(DOC).splitlines()
    assert table[0].startswith("| task | setting |") and len(table) == 2 + 5
    assert "6.360 → 4.040 / next-line acc 0.450" in table[2]
    assert "| python | dz-2b-24-g96 | 2 | 2:4 | 96 | 9.31x | 12.10x | 4.050 | 99.6% | 99.6% |" in table
    assert "| arith | bitdelta-1b | 1 | dense | row | 10.00x | 19.00x | 0.50 | 62.5% | 90.0% |" in table
    assert "| 10.10x | –x |" in table[5]


def test_plot_writes_png(tmp_path):
    out = tmp_path / "q.png"
    plot(DOC, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_joins_task_files(tmp_path):
    for task in ("arith", "python"):
        doc = {**DOC, "config": {"task": task}, "rows": [r for r in ROWS if r["task"] == task]}
        (tmp_path / f"quality-{task}.json").write_text(json.dumps(doc))
    out = tmp_path / "merged"
    out.mkdir()
    quality_main(["--merge", str(tmp_path / "quality-arith.json"), str(tmp_path / "quality-python.json"),
                  str(tmp_path / "quality-english.json"), "--out", str(out)])  # fmt: skip
    (merged,) = out.iterdir()
    assert merged.name == "quality-cpu-2026-11-26.json"
    doc = json.loads(merged.read_text())
    assert set(doc["config"]["tasks"]) == {"arith", "python"} and len(doc["rows"]) == len(ROWS)
