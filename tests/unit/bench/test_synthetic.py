"""Synthetic base + packed deltas: real artifact format, 2:4 sparse, small, tied to the base."""

import torch

from bench.synthetic import DELTA_STD, shape_config, write_suite
from deltazip.artifact import load_delta, read_manifest, verify
from deltazip.artifact.identity import base_identity
from deltazip.model.loader import load_model


def test_tiny_suite_loads_as_real_deltas(tmp_path):
    torch.set_num_threads(1)
    base_dir, artifacts = write_suite(tmp_path, "tiny", 2, bits=2, group_size=32)
    assert list(artifacts) == ["ft-000", "ft-001"]
    model = load_model(base_dir)
    assert model is not None
    deltas = [load_delta(a, "cpu") for a in artifacts.values()]
    for art in artifacts.values():
        verify(art)
        assert read_manifest(art).base_identity == base_identity(base_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    dense = [d[name].dequantize(torch.float32) for d in deltas]
    assert dense[0].shape == (96, 64)
    nonzero = (dense[0] != 0).view(96, 16, 4).sum(-1)
    assert bool((nonzero <= 2).all())  # 2:4: at most 2 kept per group (a kept code may be the zero point)
    assert 0 < float(dense[0].abs().max()) <= 2 * DELTA_STD
    assert not torch.equal(dense[0], dense[1])
    again, _ = write_suite(tmp_path, "tiny", 2, bits=2, group_size=32)  # reused, not rewritten
    assert again == base_dir


def test_7b_shape():
    config = shape_config("7b", num_layers=2)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 11008, 2)


def test_dense_kind_writes_fp16_deltas(tmp_path):
    torch.set_num_threads(1)
    _, artifacts = write_suite(tmp_path, "tiny", 1, kind="dense")
    delta = load_delta(artifacts["ft-000"], "cpu")["model.layers.1.self_attn.q_proj.weight"].dequantize(torch.float32)
    assert delta.shape == (64, 64) and float((delta != 0).float().mean()) > 0.99 and float(delta.abs().max()) < 10 * DELTA_STD
    assert read_manifest(artifacts["ft-000"]).compression["method"] == "dense"
