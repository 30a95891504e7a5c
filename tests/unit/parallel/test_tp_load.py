"""Loading a rank's slices straight from safetensors equals loading everything and sharding."""

from __future__ import annotations

import pytest
import torch

from deltazip.model.loader import load_model
from deltazip.model.synthetic import tiny_config, write_random_model
from deltazip.parallel import TPGroup, shard_model
from deltazip.parallel.load import load_sharded_model


@pytest.mark.parametrize("overrides", [
    dict(intermediate_size=128),
    dict(num_key_value_heads=1, intermediate_size=128, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    dict(num_attention_heads=3, num_key_value_heads=1, head_dim=16, intermediate_size=99, attention_bias=True),
], ids=["gqa", "replicated_kv_bias_tied", "padded_heads"])  # fmt: skip
def test_sliced_load_equals_full_load_then_shard(tmp_path, overrides):
    path = write_random_model(tmp_path / "m", tiny_config(**overrides))
    for rank in range(2):
        tp = TPGroup(rank=rank, size=2)  # loading needs no communication
        want = load_model(path)
        shard_model(want, tp)
        got = load_sharded_model(path, tp)
        assert got.config == want.config and got.full_config == want.full_config
        want_sd, got_sd = want.state_dict(), got.state_dict()
        assert want_sd.keys() == got_sd.keys()
        for k in want_sd:
            assert torch.equal(got_sd[k], want_sd[k]), k
        assert type(got.model.layers[0].mlp.down_proj) is type(want.model.layers[0].mlp.down_proj)
        if want.config.tie_word_embeddings:
            assert got.lm_head.weight is got.model.embed_tokens.weight
