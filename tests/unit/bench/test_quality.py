"""bench/quality.py: the kept-gain and ratio arithmetic, and a CPU run of the whole pipeline on a tiny model."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.quality import SETTINGS, kept_gain, main, ratios
from deltazip.model.loader import save_model_dir
from deltazip.model.synthetic import random_state_dict, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from make_datasets import arithmetic  # noqa: E402

# Dims divisible by the benchmark's group sizes (96, 64) and by 32 (2:4 packing), tied embeddings as SmolLM2.
CONFIG = tiny_config(hidden_size=192, intermediate_size=384, num_attention_heads=3, num_key_value_heads=1,
                     head_dim=64, tie_word_embeddings=True)  # fmt: skip
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_kept_gain_accuracy_and_perplexity():
    assert kept_gain(0.8, 0.0, 0.8) == 1.0
    assert kept_gain(0.4, 0.0, 0.8) == 0.5
    assert kept_gain(4.05, 6.36, 4.04) == pytest.approx((6.36 - 4.05) / (6.36 - 4.04))  # lower is better: still <= 1
    assert kept_gain(-4.05, -6.36, -4.04) == kept_gain(4.05, 6.36, 4.04)  # neg_perplexity gives the same share
    assert kept_gain(7.0, 6.36, 4.04) < 0  # worse than the base
    assert kept_gain(0.5, 0.5, 0.5) is None


def test_ratios_from_bytes():
    r = ratios(ft_bytes_fp16=1000, shard_bytes=100, zstd_bytes=80, linear_ratio=7.5)
    assert (r["ratio"], r["ratio_zstd"], r["linear_ratio"]) == (10.0, 12.5, 7.5)


def test_settings_put_allocation_then_headline_comparisons_first():
    names = [s.name for s in SETTINGS]
    assert names[:5] == ["dz-alloc-12x-zstd", "dz-alloc-16x-zstd", "dz-alloc-12x", "dz-alloc-16x", "dz-alloc-9.3x"]
    assert names[5:11] == ["dz-2b-24-g96", "dz-4b-24-g96", "magrtn-2b-24-g96", "magrtn-4b-24-g96", "bitdelta-1b",
                         "sparsegpt-ft-4b-24-g96"]  # fmt: skip
    assert len(set(names)) == len(names) and any(s.remedy for s in SETTINGS)


def _write_pair(root: Path) -> tuple[Path, Path]:
    from tests.integration.tiny_models import write_byte_tokenizer

    base_state = random_state_dict(CONFIG, seed=0)
    g = torch.Generator().manual_seed(1)
    ft_state = {k: v + (0.0 if "embed" in k else 0.01 * torch.randn(v.shape, generator=g)) for k, v in base_state.items()}
    dirs = (root / "base", root / "ft")
    for d, state in zip(dirs, (base_state, ft_state)):
        d.mkdir()
        save_model_dir(d, CONFIG, state)
        write_byte_tokenizer(d)
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return dirs


def _write_arith(data: Path, num_train: int, num_eval: int) -> Path:
    """data/{train,eval}.jsonl of generated arithmetic problems (the layout scripts/make_datasets.py writes)."""
    train, held = arithmetic(num_train, num_eval, seed=0)
    data.mkdir(parents=True)
    for name, rows in (("train", train), ("eval", held)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_quality_pipeline_on_tiny_model(tmp_path):
    torch.set_num_threads(1)
    base, ft = _write_pair(tmp_path)
    data = _write_arith(tmp_path / "data" / "arith", 40, 3)
    out = tmp_path / "out" / "quality-arith.json"
    main(["--base", str(base), "--ft", str(ft), "--data", str(data), "--out", str(out), "--rows", "3",
          "--seq-len", "32", "--nsamples", "32", "--work", str(tmp_path / "work"), "--device", "cpu",
          "--settings", "dz-2b-24-g96,bitdelta-1b,sparsegpt-ft-4b-24-g96,dz-3b-dense-g96"])  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["bench"] == "quality"
    rows = {r["setting"]: r for r in doc["rows"]}
    assert list(rows) == ["base", "finetune", "dz-2b-24-g96", "bitdelta-1b", "sparsegpt-ft-4b-24-g96", "dz-3b-dense-g96"]
    assert rows["finetune"]["kept_gain_ppl"] == 1.0 and rows["base"]["kept_gain_ppl"] == 0.0
    for name in ("dz-2b-24-g96", "bitdelta-1b", "sparsegpt-ft-4b-24-g96", "dz-3b-dense-g96"):
        r = rows[name]
        assert r["ratio"] > 1.0 and r["ratio_zstd"] > 0 and r["shard_bytes"] > 0
        assert 0.0 <= r["quality"] <= 1.0 and r["perplexity"] > 1.0
        assert len(r["layer_out_rel_error"]) == CONFIG.num_hidden_layers and r["worst_tensors"]
    assert rows["bitdelta-1b"]["bits"] == 1
    assert rows["dz-2b-24-g96"]["ratio"] > rows["dz-3b-dense-g96"]["ratio"]
    # kept gain in perplexity: a close compression of the delta keeps most of it, unlike pruning the weights
    assert rows["dz-3b-dense-g96"]["kept_gain_ppl"] > 0.5
    assert not list((tmp_path / "work").iterdir())  # artifacts removed after each setting


def test_allocation_settings_report_ratio_and_mix(tmp_path):
    torch.set_num_threads(1)
    base, ft = _write_pair(tmp_path)
    data = _write_arith(tmp_path / "data" / "arith", 40, 2)
    out = tmp_path / "q.json"
    main(["--base", str(base), "--ft", str(ft), "--data", str(data), "--out", str(out), "--rows", "2",
          "--seq-len", "32", "--nsamples", "16", "--work", str(tmp_path / "work"), "--device", "cpu",
          "--settings", "dz-alloc-12x-zstd,dz-alloc-12x"])  # fmt: skip
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    plain, zstd = rows["dz-alloc-12x"], rows["dz-alloc-12x-zstd"]
    assert plain["ratio"] >= 12.0 and plain["target_counts"] == "plain"
    assert zstd["ratio_zstd"] >= 12.0 and zstd["target_counts"] == "zstd" and zstd["ratio"] < zstd["ratio_zstd"]
    for r in (plain, zstd):
        assert sum(r["alloc_counts"].values()) == 7 * CONFIG.num_hidden_layers
        assert r["alloc_counts"].get("drop", 0) == len(r["alloc_dropped"]) and r["bits"] == "4/2+drop"
        assert r["target_ratio"] == 12 and r["kept_gain_ppl"] is not None
    # zstd counts fewer bytes per option, so the same target keeps more deltas
    assert zstd["alloc_counts"].get("drop", 0) <= plain["alloc_counts"].get("drop", 0)


def test_deadline_skips_settings(tmp_path):
    torch.set_num_threads(1)
    base, ft = _write_pair(tmp_path)
    data = _write_arith(tmp_path / "arith", 20, 2)
    out = tmp_path / "q.json"
    main(["--base", str(base), "--ft", str(ft), "--data", str(data), "--out", str(out), "--rows", "2", "--seq-len", "32",
          "--work", str(tmp_path / "w"), "--device", "cpu", "--settings", "dz-2b-24-g96,bitdelta-1b",
          "--deadline", str(time.time() + 5), "--first-setting-s", "60"])  # fmt: skip
    doc = json.loads(out.read_text())
    assert [r["setting"] for r in doc["rows"]] == ["base", "finetune"]
    assert doc["config"]["skipped"] == ["dz-2b-24-g96", "bitdelta-1b"]


def test_a_failing_setting_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import bench.quality as quality

    torch.set_num_threads(1)
    base, ft = _write_pair(tmp_path)
    data = _write_arith(tmp_path / "arith", 20, 2)
    real = quality.run_setting

    def flaky(s, *args):
        if s.name == "magrtn-2b-24-g96":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(s, *args)

    monkeypatch.setattr(quality, "run_setting", flaky)
    out = tmp_path / "q.json"
    main(["--base", str(base), "--ft", str(ft), "--data", str(data), "--out", str(out), "--rows", "2", "--seq-len", "32",
          "--nsamples", "8", "--work", str(tmp_path / "w"), "--device", "cpu",
          "--settings", "magrtn-2b-24-g96,bitdelta-1b"])  # fmt: skip
    doc = json.loads(out.read_text())
    assert [r["setting"] for r in doc["rows"]] == ["base", "finetune", "bitdelta-1b"]
    assert "simulated" in doc["config"]["failed"]["magrtn-2b-24-g96"]
