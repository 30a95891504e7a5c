"""Load-time delta sharding: every rank's packed shard dequantizes to exactly its slice of the full delta."""

from __future__ import annotations

import pytest
import torch

from deltazip.model.synthetic import tiny_config
from deltazip.parallel import ShardPlan, TensorSplit, shard_delta, shard_delta_tensor
from tp_fixtures import random_packed_delta

N, K = 48, 256


def slices(size: int, tp: int) -> list[tuple[int, int]]:
    return [(r * size // tp, (r + 1) * size // tp) for r in range(tp)]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse24", "quant"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32, 64], ids=["row", "g32", "g64"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_packed_shard_dequantizes_to_the_slice_bit_exact(tp, dim, sparse, bits, group_size, sym):
    t = random_packed_delta("model.layers.0.mlp.down_proj.weight", N, K, bits, group_size, sym, sparse, seed=bits)
    full = t.dequantize(torch.float32)  # [N, K]
    size = N if dim == 0 else K
    for a, b in slices(size, tp):
        part = shard_delta_tensor(t, TensorSplit(dim, a, b))
        assert part.kind == t.kind and part.shape == tuple(full.narrow(dim, a, b - a).shape)
        torch.testing.assert_close(part.dequantize(torch.float32), full.narrow(dim, a, b - a), atol=0, rtol=0)


def test_dense_delta_shards_are_slices():
    from deltazip.artifact.delta_tensor import DeltaTensor

    d = torch.randn(N, K).half()
    t = DeltaTensor("x", "dense", (N, K), delta=d)
    assert torch.equal(shard_delta_tensor(t, TensorSplit(1, 64, 128)).delta, d[:, 64:128])
    assert torch.equal(shard_delta_tensor(t, TensorSplit(0, 24, 48)).delta, d[24:48])


def test_misaligned_group_raises_naming_the_tensor_or_falls_back_to_dense():
    t = random_packed_delta("model.layers.3.mlp.down_proj.weight", N, 192, 4, 64, True, True)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj\.weight.*group"):
        shard_delta_tensor(t, TensorSplit(1, 96, 192))  # 96 cuts a 64-column group
    part = shard_delta_tensor(t, TensorSplit(1, 96, 192), misaligned="dense")
    assert part.kind == "dense"
    torch.testing.assert_close(part.dequantize(torch.float32), t.dequantize(torch.float32)[:, 96:], atol=0, rtol=0)


def test_sparse24_split_off_a_32_column_boundary_raises():
    t = random_packed_delta("model.layers.0.self_attn.o_proj.weight", N, 96, 4, None, True, True)
    with pytest.raises(ValueError, match=r"o_proj\.weight.*multiple of 32"):
        shard_delta_tensor(t, TensorSplit(1, 0, 48))


def test_shard_delta_applies_the_plan_per_tensor():
    cfg = tiny_config(intermediate_size=128, mlp_bias=True)  # heads 4, kv 2, head_dim 16
    names = {
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.self_attn.k_proj.weight": (32, 64),
        "model.layers.0.self_attn.o_proj.weight": (64, 64),
        "model.layers.0.mlp.down_proj.weight": (64, 128),
        "model.layers.0.mlp.down_proj.bias": (64,),
        "model.layers.0.input_layernorm.weight": (64,),
        "model.embed_tokens.weight": (256, 64),
    }
    deltas = {k: torch.randn(s) for k, s in names.items()}
    rank1 = shard_delta(deltas, ShardPlan(cfg, 2, 1))
    want = {"self_attn.q_proj": (slice(32, None),), "self_attn.k_proj": (slice(16, None),),
            "self_attn.o_proj": (slice(None), slice(32, None)), "mlp.down_proj": (slice(None), slice(64, None))}
    for module, index in want.items():
        name = f"model.layers.0.{module}.weight"
        assert torch.equal(rank1[name], deltas[name][index]), name
    assert "model.layers.0.mlp.down_proj.bias" not in rank1  # row-parallel bias: rank 0 only
    assert "model.layers.0.mlp.down_proj.bias" in shard_delta(deltas, ShardPlan(cfg, 2, 0))
    assert rank1["model.embed_tokens.weight"] is deltas["model.embed_tokens.weight"]  # replicated, shared
