"""StepDeltaOps on a tiny Llama: one mixed batch (base + two deltas) equals each merged model alone."""

import pytest
import torch

from deltazip.model.layers import NamedLinear
from deltazip.model.loader import model_from_state_dict, save_model_dir
from deltazip.model.synthetic import random_state_dict, tiny_config
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_batch_equals_merged_weights(tmp_path, tied):
    from deltazip.artifact import load_delta, write_dense_delta

    config = tiny_config(tie_word_embeddings=tied)
    base_state = random_state_dict(config, seed=0)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_model_dir(base_dir, config, base_state)
    base = model_from_state_dict(config, base_state)
    linear_names = {m.hf_name + ".weight" for m in base.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(2, "cpu", torch.float32, linear_names, tie_word_embeddings=tied)
    merged = []
    for slot in range(2):
        g = torch.Generator().manual_seed(slot + 1)
        ft_state = {k: v + 0.03 * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
        ft_dir = tmp_path / f"ft{slot}"
        ft_dir.mkdir()
        save_model_dir(ft_dir, config, ft_state)
        write_dense_delta(base_dir, ft_dir, tmp_path / f"delta{slot}")
        deltas = load_delta(tmp_path / f"delta{slot}", "cpu")
        assert ("lm_head.weight" in deltas) != tied
        slots.write(slot, f"ft{slot}", deltas)
        state = {k: v + deltas[k].dequantize(torch.float32) if k in deltas else v for k, v in base_state.items()}
        merged.append(model_from_state_dict(config, state))

    seq_len = 7
    ids = torch.randint(0, config.vocab_size, (3, seq_len), generator=torch.Generator().manual_seed(5))
    ops = StepDeltaOps(slots, [(None, seq_len), (0, seq_len), (1, seq_len)])
    with torch.no_grad():
        got = base.forward_dense(ids, deltas=ops)  # [3, L, V]
        want = [base.forward_dense(ids[:1]), merged[0].forward_dense(ids[1:2]), merged[1].forward_dense(ids[2:])]
    for row, expected in enumerate(want):
        torch.testing.assert_close(got[row], expected[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want[1], want[2])  # the deltas really differ
