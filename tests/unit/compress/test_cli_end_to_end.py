"""compress -> inspect -> restore through the CLI on a really fine-tuned tiny Llama."""

import json
import shutil

import pytest
import torch
from tiny_finetune import held_out_ids

from deltazip.artifact import BaseMismatchError, CorruptArtifactError, load_delta, read_manifest, write_dense_delta
from deltazip.cli import main
from deltazip.model.loader import load_model

CALIB = ["--nsamples", "16", "--seq-len", "64", "--no-progress"]
VARIANTS = {  # name -> compress flags
    "b2_row": ["--bits", "2", "--group-size", "0"],
    "b4_row": ["--bits", "4", "--group-size", "0"],
    "b4_g128_zstd": ["--bits", "4", "--group-size", "128", "--asym", "--lossless", "zstd"],
    "b2_row_emb": ["--bits", "2", "--group-size", "0", "--embeddings", "compress"],
}


@pytest.fixture(scope="module")
def artifacts(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, flags in VARIANTS.items():
        out[name] = root / name
        assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out[name]), *flags, *CALIB]) == 0
    out["dense"] = root / "dense"
    write_dense_delta(models["base"], models["ft"], out["dense"])
    return out


def inspect_json(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json", "--verify"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_ratios_from_bytes_on_disk(artifacts, capsys):
    b2, b4 = inspect_json(capsys, artifacts["b2_row"]), inspect_json(capsys, artifacts["b4_row"])
    for s, path in ((b2, artifacts["b2_row"]), (b4, artifacts["b4_row"])):
        assert s["shard_bytes"] == sum(p.stat().st_size for p in path.glob("delta-*"))
        linear_params = s["linear_ft_bytes_fp16"] // 2
        assert abs(s["linear_bits_per_weight"] - 8 * s["linear_bytes"] / linear_params) < 1e-6
    print(f"linear ratio 2-bit 2:4 per-row {b2['linear_ratio']:.2f}x, 4-bit {b4['linear_ratio']:.2f}x; "
          f"whole artifact {b2['ratio']:.2f}x / {b4['ratio']:.2f}x")  # fmt: skip
    assert b2["linear_ratio"] >= 7.5
    assert b4["linear_ratio"] >= 5.0
    rows = {r["name"]: r for r in b2["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["kind"] == "sparse24" and q["bits"] == 2 and 0 < q["out_rel_error"] < 1


def test_zstd_stage_is_lossless(artifacts, capsys):
    manifest = read_manifest(artifacts["b4_g128_zstd"])
    assert all(s.codec == "zstd" and s.size < s.raw_size for s in manifest.shards.values())
    deltas = load_delta(artifacts["b4_g128_zstd"], "cpu")
    q = deltas["model.layers.1.mlp.down_proj.weight"]
    assert q.kind == "sparse24" and q.zeros is not None and q.dequantize(torch.float32).abs().sum() > 0
    print(f"zstd: {sum(s.raw_size for s in manifest.shards.values())} -> {sum(s.size for s in manifest.shards.values())} bytes")


def logits_of(model_dir) -> torch.Tensor:
    with torch.no_grad():
        return load_model(model_dir).forward_dense(held_out_ids())  # [B, L, V] fp32


def test_restore_reproduces_fine_tuned_logits(models, artifacts, tmp_path):
    base, ft = logits_of(models["base"]), logits_of(models["ft"])
    assert main(["restore", str(models["base"]), str(artifacts["dense"]), "-o", str(tmp_path / "dense")]) == 0
    dense = logits_of(tmp_path / "dense")
    # Lossless path: fp16 delta + bf16 re-rounding of the weights; measured max |diff| ~1e-2 on logits of size ~10.
    assert float((dense - ft).abs().max()) < 0.05
    for name, bound in (("b4_row", 0.2), ("b2_row", 0.3), ("b2_row_emb", 0.35)):
        assert main(["restore", str(models["base"]), str(artifacts[name]), "-o", str(tmp_path / name)]) == 0
        restored = logits_of(tmp_path / name)
        # Compression error relative to what the fine-tune changed: measured 0.06-0.10 (4-bit), 0.17-0.18 (2-bit),
        # 0.20 (2-bit with packed embedding/lm_head deltas); top-1 agreement 0.91-0.97.
        rel = float((restored - ft).norm() / (ft - base).norm())
        top1 = float((restored.argmax(-1) == ft.argmax(-1)).float().mean())
        print(f"{name}: logits rel err vs fine-tune change {rel:.3f}, top-1 agreement {top1:.3f}")
        assert rel < bound and top1 > 0.9


def test_corrupted_shard_is_refused(models, artifacts, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["b4_row"], broken)
    shard = broken / next(iter(read_manifest(broken).shards))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        load_delta(broken, "cpu")
    capsys.readouterr()
    assert main(["restore", str(models["base"]), str(broken), "-o", str(tmp_path / "out")]) == 2
    assert "re-fetch" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_delta_against_another_base_is_refused(models, artifacts, tmp_path, capsys):
    with pytest.raises(BaseMismatchError, match="made against base sha256:"):
        load_delta(artifacts["b2_row"], "cpu", base_dir=models["other_base"])
    capsys.readouterr()
    assert main(["restore", str(models["other_base"]), str(artifacts["b2_row"]), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert read_manifest(artifacts["b2_row"]).base_identity in err and not (tmp_path / "x").exists()


def test_failed_compress_leaves_nothing(models, tmp_path, monkeypatch):
    import deltazip.compress.driver as driver

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash mid-compression")

    monkeypatch.setattr(driver, "compress_stage", boom)
    with pytest.raises(RuntimeError):
        main(["compress", str(models["base"]), str(models["ft"]), "-o", str(tmp_path / "out"), *CALIB])
    assert list(tmp_path.iterdir()) == []


def test_packed_embeddings_raise_the_whole_ratio(artifacts, capsys):
    fp16, packed = inspect_json(capsys, artifacts["b2_row"]), inspect_json(capsys, artifacts["b2_row_emb"])
    rows = {r["name"]: r for r in packed["tensors"]}
    assert rows["lm_head.weight"]["kind"] == "sparse24" and rows["lm_head.weight"]["out_rel_error"] < 1
    assert rows["model.embed_tokens.weight"]["kind"] == "sparse24"
    print(f"whole-artifact ratio 2-bit: {fp16['ratio']:.2f}x with fp16 embeddings, {packed['ratio']:.2f}x packed")
    assert packed["ratio"] > 1.4 * fp16["ratio"]


@pytest.mark.parametrize("method", ["magnitude_rtn", "bitdelta", "sparsegpt_full"])
def test_baselines_run_in_the_same_path(models, tmp_path, method):
    from deltazip.artifact import ArtifactError

    out = tmp_path / method
    flags = ["--method", method, "--bits", "4", "--group-size", "0", *CALIB]
    assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out), *flags]) == 0
    assert main(["restore", str(models["base"]), str(out), "-o", str(tmp_path / "r")]) == 0
    base, ft, restored = logits_of(models["base"]), logits_of(models["ft"]), logits_of(tmp_path / "r")
    rel = float((restored - ft).norm() / (ft - base).norm())
    assert rel < 1.0, rel  # closer to the fine-tune than the base is; OBS (~0.1) does far better
    if method == "sparsegpt_full":  # stores compressed fine-tuned weights, not a delta: not servable
        with pytest.raises(ArtifactError, match="not a delta"):
            load_delta(out, "cpu")
    else:
        assert len(load_delta(out, "cpu")) > 0
