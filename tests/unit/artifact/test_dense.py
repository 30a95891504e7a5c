"""Dense fp16 delta artifacts: write, verify, load, restore, refuse corruption and wrong bases."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltazip.artifact import (
    BaseMismatchError,
    CorruptArtifactError,
    base_identity,
    load_delta,
    read_manifest,
    restore,
    verify,
    write_dense_delta,
)
from deltazip.artifact.checkpoint import Checkpoint


def test_identity_ignores_sharding_but_not_weights(ckpts):
    assert base_identity(ckpts["base"]) == base_identity(ckpts["base_resharded"])
    assert base_identity(ckpts["base"]) != base_identity(ckpts["other_base"])


def test_dense_delta_round_trip(ckpts, dense_artifact):
    manifest = verify(dense_artifact, base_dir=ckpts["base"])
    assert "model.layers.1.self_attn.k_proj.weight" not in manifest.tensors  # zero delta skipped
    deltas = load_delta(dense_artifact, "cpu", base_dir=ckpts["base"])
    base, ft = Checkpoint(ckpts["base"]), Checkpoint(ckpts["ft"])
    for name, delta in deltas.items():
        assert delta.kind == "dense" and delta.delta.dtype == torch.float16
        want = ft.get(name).float() - base.get(name).float()
        torch.testing.assert_close(delta.dequantize(torch.float32), want, rtol=1e-3, atol=1e-6)
    # byte-identical to the base's copy, so not stored (restore takes the base's)
    assert not (dense_artifact / "files" / "tokenizer_config.json").exists()


def test_restore_reproduces_fine_tune(ckpts, dense_artifact, tmp_path):
    out = restore(ckpts["base"], dense_artifact, tmp_path / "restored")
    restored, ft = load_file(out / "model.safetensors"), Checkpoint(ckpts["ft"])
    assert set(restored) == set(ft.names())
    assert (out / "tokenizer_config.json").read_bytes() == (ckpts["ft"] / "tokenizer_config.json").read_bytes()
    for name, tensor in restored.items():
        assert tensor.dtype == torch.bfloat16
        # fp16 rounding of the delta (|d| < 0.05: < 2e-5) plus one bf16 ulp of the sum.
        torch.testing.assert_close(tensor, ft.get(name), rtol=8e-3, atol=3e-5)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_corrupted_shard_is_refused(ckpts, dense_artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dense_artifact, broken)
    shard = next(iter(read_manifest(broken).shards))
    data = bytearray((broken / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / shard).write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="sha256"):
        verify(broken)
    with pytest.raises(CorruptArtifactError, match="re-fetch"):
        load_delta(broken, "cpu")
    (broken / shard).write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptArtifactError, match="truncated"):
        verify(broken)


def test_other_base_is_refused(ckpts, dense_artifact, tmp_path):
    with pytest.raises(BaseMismatchError) as err:
        load_delta(dense_artifact, "cpu", base_dir=ckpts["other_base"])
    msg = str(err.value)
    assert base_identity(ckpts["base"]) in msg and base_identity(ckpts["other_base"]) in msg
    with pytest.raises(BaseMismatchError):
        restore(ckpts["other_base"], dense_artifact, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_write_leaves_nothing(ckpts, tmp_path):
    out = tmp_path / "delta"
    with pytest.raises(Exception):
        write_dense_delta(ckpts["base"], ckpts["other_base"] / "missing", out)
    assert list(tmp_path.iterdir()) == []
    write_dense_delta(ckpts["base"], ckpts["ft"], out)
    with pytest.raises(FileExistsError):
        write_dense_delta(ckpts["base"], ckpts["ft"], out)
    assert [p.name for p in tmp_path.iterdir()] == ["delta"]
