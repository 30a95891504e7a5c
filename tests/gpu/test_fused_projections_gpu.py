"""Fused q/k/v and gate/up on CUDA: a fused model over fused slot stacks (sp4 4-bit, sp2 2-bit: the worker's
layouts) equals the separate projections over separate stacks, eager and through GraphDeltaOps, including a delta
whose k_proj is missing (its members run unfused, on column views of the fused output). Skips without CUDA.

Run: TRITON_INTERPRET= PYTHONPATH=. python -m pytest -q tests/gpu/test_fused_projections_gpu.py
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _models_and_slots(dtype):
    """A 2-layer model and a copy with fused projections (same weights), and DeviceSlots for each (separate and
    fused stacks) holding a 4-bit delta (with norm deltas), a 2-bit one and a 4-bit one without k_proj."""
    from deltazip.model.layers import NamedLinear
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from services.worker.device_slots import DeviceSlots
    from tests.unit.worker.test_graph_deltas import make_delta

    cfg = tiny_config(hidden_size=512, intermediate_size=1024, head_dim=64, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=256)
    state = {k: v.to("cuda", dtype) for k, v in random_state_dict(cfg, seed=3).items()}
    model, fused_model = model_from_state_dict(cfg, dict(state)), model_from_state_dict(cfg, dict(state))
    assert fused_model.fuse_projections() == 2 * cfg.num_hidden_layers
    names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    no_k = {n: d for n, d in make_delta(model, 4, 5, with_dense=False, group=128).items() if "k_proj" not in n}
    slots = {}
    for fuse in (False, True):
        s = DeviceSlots(3, "cuda", dtype, names, False, sp2=True,
                        fused=fused_model.fused_tensor_names() if fuse else None)
        s.write(0, "a", make_delta(model, 4, 1, with_dense=True, group=128))
        s.write(1, "b", make_delta(model, 2, 2, with_dense=False, group=128))
        s.write(2, "c", no_k)
        slots[fuse] = s
    return cfg, model, fused_model, slots


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True])
def test_fused_model_and_slots_equal_separate_ones_on_cuda(dtype, graph):
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.graph_deltas import GraphDeltaOps

    cfg, model, fused_model, slots = _models_and_slots(dtype)
    layouts = {st.layout for n, sts in slots[True].stacks_by_name().items() if "qkv" in n for st in sts}
    assert layouts == {"sp4", "sp2"}
    assert slots[True].stack(2, "model.layers.0.self_attn.qkv_proj.weight") is None  # k missing: unfused
    segments = [(1, 3), (None, 2), (0, 4), (2, 3)]
    rows = sum(n for _, n in segments)
    ids = torch.randint(0, cfg.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(8)).cuda()
    with torch.inference_mode():
        want = model.hidden_dense(ids, deltas=StepDeltaOps(slots[False], segments))
        if graph:
            ops = GraphDeltaOps(slots[True], max_rows=16, max_segments=6)
            ops.fill(segments, rows)
            got = fused_model.hidden_dense(ids, deltas=ops.for_rows(rows))
        else:
            got = fused_model.hidden_dense(ids, deltas=StepDeltaOps(slots[True], segments))
        base = model.hidden_dense(ids)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert not torch.allclose(want[:3], base[:3], rtol=tol, atol=tol)  # the deltas change their rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_segments_run_on_merged_weights_and_equal_base_plus_delta(dtype, monkeypatch):
    """Segments of at least sbmm.dense_rows rows run each linear as one GEMM on base + Δ (StepDeltaOps.merged_linear,
    fused groups on their stacked weight); short ones, base rows and a delta whose k_proj is missing (its q/k/v
    members unfused) keep the base GEMM + delta path. The model's output equals the separate projections with
    every segment on SBMM."""
    from kernels import delta_linear, sbmm
    from services.worker.delta_ops import StepDeltaOps

    cfg, model, fused_model, slots = _models_and_slots(dtype)
    merged = []
    real = delta_linear.merged_linear
    monkeypatch.setattr(delta_linear, "merged_linear", lambda x, out, w, b, stack, slot: merged.append(
        (x.shape[0], w.shape[0], slot)) or real(x, out, w, b, stack, slot))
    segments = [(1, 300), (None, 2), (0, 40), (2, 260), (0, 3)]
    rows = sum(n for _, n in segments)
    ids = torch.randint(0, cfg.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(8)).cuda()
    with torch.inference_mode():
        monkeypatch.setattr(sbmm, "dense_rows", lambda device, bits: None)
        sbmm_ops = StepDeltaOps(slots[False], segments)
        want = model.hidden_dense(ids, deltas=sbmm_ops)
        assert not merged and not sbmm_ops.dense_route_used
        monkeypatch.setattr(sbmm, "dense_rows", lambda device, bits: 256)
        dense_ops = StepDeltaOps(slots[True], segments)
        got = fused_model.hidden_dense(ids, deltas=dense_ops)
        assert dense_ops.dense_route_used  # what the engine's `dense_route` profile phase counts
    layers = cfg.num_hidden_layers
    qkv, gate_up = 512 + 2 * 128, 2 * 1024
    # slot 1: its q/k/v and gate/up groups and o / down on merged weights; slot 2 (no k_proj): all but q/k/v; each
    # on its row bucket (delta_ops.gemm_window: 300 -> 320 rows from its start, 260 -> 288 ending at the last row)
    assert sorted(merged) == sorted([(320, qkv, 1), (320, 512, 1), (320, gate_up, 1), (320, 512, 1)] * layers
                                    + [(288, 512, 2), (288, gate_up, 2), (288, 512, 2)] * layers)
    # base + Δ is rounded once to the weights' dtype, as a fine-tuned checkpoint in that dtype stores its weights
    # (Δ is ~1 % of W, so bf16's 8-bit mantissa keeps Δ to a few bits): on an H100 the outputs differ from the
    # separate products by up to 6.4e-3 (fp16) and 7.0e-2 (bf16, 0.1 % of the elements past 3e-2)
    tol = 1e-1 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_cache_keeps_base_plus_delta_between_steps(dtype, monkeypatch):
    """services/worker/merged_cache.py through StepDeltaOps: a 300-row segment admits its slot (admit_rows 256) and
    each of its linears is expanded once into the cache; the next forward finds them there (hits, no new build)
    and also takes a 70-row segment of that slot (use_rows 64); a slot written again is expanded anew. Outputs
    equal the separate projections with every segment on SBMM, within the merged route's tolerances."""
    from kernels import sbmm
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.merged_cache import MergedCache
    from tests.unit.worker.test_graph_deltas import make_delta

    cfg, model, fused_model, slots = _models_and_slots(dtype)
    monkeypatch.setattr(sbmm, "dense_rows", lambda device, bits: None)  # no uncached dense route: the cache's alone
    cache = slots[True].merged_cache = MergedCache(1 << 30, admit_rows=256, use_rows=64)
    tol = 1e-1 if dtype == torch.bfloat16 else 1e-2
    layers = cfg.num_hidden_layers

    def forward(segments, seed):
        rows = sum(n for _, n in segments)
        ids = torch.randint(0, cfg.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.inference_mode():
            want = model.hidden_dense(ids, deltas=StepDeltaOps(slots[False], segments))
            ops = StepDeltaOps(slots[True], segments)
            got = fused_model.hidden_dense(ids, deltas=ops)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        return ops

    ops = forward([(1, 300), (None, 2), (0, 40), (2, 3)], 1)
    assert ops.dense_route_used and cache.kept_slots() == [1]
    assert cache.builds == 4 * layers and cache.hits == 0  # q/k/v, o, gate/up, down of slot 1, once each
    ops = forward([(0, 5), (1, 70), (None, 9)], 2)
    assert ops.dense_route_used and cache.builds == 4 * layers and cache.hits == 4 * layers
    ops = forward([(0, 70)], 3)  # slot 0 is not kept and 70 < admit_rows: SBMM
    assert not ops.dense_route_used and cache.kept_slots() == [1]
    slots[True].write(1, "b2", make_delta(model, 2, 9, with_dense=False, group=128))
    slots[False].write(1, "b2", make_delta(model, 2, 9, with_dense=False, group=128))
    ops = forward([(1, 70)], 4)  # the slot's weights are stale and 70 rows do not admit it: SBMM
    assert not ops.dense_route_used
    forward([(1, 260)], 5)  # admitted again: expanded from the new delta
    assert cache.builds == 8 * layers and cache.kept_slots() == [1]
