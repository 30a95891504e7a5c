"""Synthetic base + packed deltas: real artifact format, 2:4 sparse, small, tied to the base."""

import pytest
import torch

from bench.synthetic import DELTA_STD, shape_config, write_suite
from deltazip.artifact import load_delta, read_manifest, verify
from deltazip.artifact.identity import base_identity
from deltazip.model.loader import load_model
from deltazip.model.synthetic import random_state_dict


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


@pytest.mark.parametrize("shape, hidden, ffn, heads", [("7b", 4096, 11008, 32), ("13b", 5120, 13824, 40)])
def test_llama2_shapes_have_llama2_linears(shape, hidden, ffn, heads):
    """Every linear of the cut model has Llama-2's shape (head_dim 128: q/k/v/o are hidden x hidden)."""
    config = shape_config(shape, num_layers=2)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (hidden, ffn, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, heads, 128)
    with torch.device("meta"):
        state = random_state_dict(config)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (hidden, hidden)
    assert state["model.layers.1.self_attn.o_proj.weight"].shape == (hidden, hidden)
    assert state["model.layers.1.mlp.down_proj.weight"].shape == (hidden, ffn)
    assert state["lm_head.weight"].shape == (32000, hidden)


def test_dense_kind_writes_fp16_deltas(tmp_path):
    torch.set_num_threads(1)
    _, artifacts = write_suite(tmp_path, "tiny", 1, kind="dense")
    delta = load_delta(artifacts["ft-000"], "cpu")["model.layers.1.self_attn.q_proj.weight"].dequantize(torch.float32)
    assert delta.shape == (64, 64) and float((delta != 0).float().mean()) > 0.99 and float(delta.abs().max()) < 10 * DELTA_STD
    assert read_manifest(artifacts["ft-000"]).compression["method"] == "dense"


def test_jobs_write_the_same_deltas_as_one_process(tmp_path):
    """--jobs only changes how many deltas are written at once: every file's bytes depend on the delta's index."""
    torch.set_num_threads(1)
    _, serial = write_suite(tmp_path / "one", "tiny", 3, bits=4, group_size=32)
    _, parallel = write_suite(tmp_path / "many", "tiny", 3, bits=4, group_size=32, jobs=2)
    assert list(parallel) == list(serial)
    for name, art in parallel.items():
        verify(art)
        files = sorted(p.name for p in art.iterdir() if p.suffix == ".safetensors")
        assert files and files == sorted(p.name for p in serial[name].iterdir() if p.suffix == ".safetensors")
        for f in files:
            assert (art / f).read_bytes() == (serial[name] / f).read_bytes()
