"""GraphDeltaOps (the CUDA-graph form of a step's delta ops) computes exactly what StepDeltaOps computes.

Run eagerly here (SBMM under the Triton interpreter on CPU); tests/gpu/test_worker_gpu.py replays it from
captured graphs. Mixed formats (4-bit and 2-bit stacks of one tensor), norm and embedding deltas, base
rows, padded rows, and a slot reused by a delta of another format (DeviceSlots must zero what it left).
"""

import os

import pytest
import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.model.layers import NamedLinear
from deltazip.model.synthetic import random_model, tiny_config
from kernels import packing
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots
from services.worker.graph_deltas import GraphDeltaOps, graph_supported

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU tensors through SBMM need TRITON_INTERPRET=1 (the CUDA twin is in tests/gpu)")


def packed(name, n, k, bits, gen, group=32):
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)
    codes = torch.randint(0, 1 << bits, (n, k // 2), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.002).half()
    return DeltaTensor(name=name, kind="sparse24", shape=(n, k), bits=bits, group_size=group, sym=True,
                       qweight=packing.pack_codes(codes, bits), meta=packing.pack_meta(mask), scales=scales)


def dense(name, shape, gen):
    return DeltaTensor(name=name, kind="dense", shape=tuple(shape),
                       delta=(torch.randn(shape, generator=gen) * 0.05).half())


def make_delta(model, bits, seed, with_dense, group=32):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in model.modules():
        if isinstance(m, NamedLinear) and m.hf_name.startswith("model.layers."):
            n, k = m.weight.shape
            out[m.hf_name + ".weight"] = packed(m.hf_name + ".weight", n, k, bits, gen, group)
    if with_dense:
        for name, p in model.named_parameters():
            if "norm" in name or "embed_tokens" in name:
                out[name] = dense(name, p.shape, gen)
    return out


def test_graph_ops_equal_step_ops_on_a_mixed_batch():
    config = tiny_config(tie_word_embeddings=True)
    model = random_model(config, seed=0)
    linear_names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(4, "cpu", torch.float32, linear_names, tie_word_embeddings=True)
    slots.write(0, "a", make_delta(model, 4, 1, with_dense=True))
    slots.write(1, "c", make_delta(model, 4, 3, with_dense=True))
    slots.write(1, "d", make_delta(model, 2, 4, with_dense=False))  # slot 1 leaves the 4-bit and dense stacks
    slots.write(2, "b", make_delta(model, 2, 2, with_dense=False))
    assert graph_supported(slots)
    assert all(len(s) == 2 for n, s in slots.stacks_by_name().items() if "proj" in n)  # 4-bit and 2-bit stacks

    segments = [(None, 2), (0, 3), (1, 1), (2, 2)]
    rows, padded = 8, 10
    ids = torch.randint(0, config.vocab_size, (padded, 1), generator=torch.Generator().manual_seed(7))
    graph = GraphDeltaOps(slots, max_rows=16, max_segments=6)
    graph.fill(segments, padded)
    with torch.no_grad():
        want = model.hidden_dense(ids[:rows], deltas=StepDeltaOps(slots, segments))
        got = model.hidden_dense(ids, deltas=graph.for_rows(padded))
        base = model.hidden_dense(ids)
    torch.testing.assert_close(got[:rows], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[rows:], base[rows:], rtol=1e-5, atol=1e-5)  # padded rows: base
    assert not torch.allclose(got[2:5], base[2:5])  # the deltas do something


def test_graph_ops_read_tiled_4bit_stacks_like_canonical_ones():
    """Slots holding 4-bit deltas tile-major (as CUDA slots do where N and K tile: here every linear but down_proj,
    whose K = 320 does not; K = 256 is two tiles per row, so the order differs from the canonical one) give,
    eagerly and through the graph form's SBMM launches, what canonical slots give."""
    config = tiny_config(hidden_size=256, intermediate_size=320, head_dim=64)
    model = random_model(config, seed=0)
    linear_names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    by_order = {}
    for tiled4 in (False, True):
        slots = DeviceSlots(3, "cpu", torch.float32, linear_names, tie_word_embeddings=False, tiled4=tiled4)
        slots.write(0, "a", make_delta(model, 4, 1, with_dense=False))
        slots.write(2, "b", make_delta(model, 4, 2, with_dense=False))
        by_order[tiled4] = slots
    layouts = {name: stacks[0].layout for name, stacks in by_order[True].stacks_by_name().items()}
    assert {lay for name, lay in layouts.items() if "down_proj" in name} == {"canonical"}
    assert {lay for name, lay in layouts.items() if "down_proj" not in name} == {"tiled4"}
    segments = [(2, 2), (None, 1), (0, 3)]
    ids = torch.randint(0, config.vocab_size, (6, 1), generator=torch.Generator().manual_seed(8))
    graph = GraphDeltaOps(by_order[True], max_rows=8, max_segments=4)
    graph.fill(segments, 6)
    with torch.no_grad():
        want = model.hidden_dense(ids, deltas=StepDeltaOps(by_order[False], segments))
        eager = model.hidden_dense(ids, deltas=StepDeltaOps(by_order[True], segments))
        got = model.hidden_dense(ids, deltas=graph.for_rows(6))
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fill_rejects_too_many_segments_and_rows():
    config = tiny_config()
    model = random_model(config, seed=0)
    slots = DeviceSlots(4, "cpu", torch.float32, {m.hf_name + ".weight" for m in model.modules()
                                                   if isinstance(m, NamedLinear)}, tie_word_embeddings=False)
    graph = GraphDeltaOps(slots, max_rows=8, max_segments=3)
    with pytest.raises(ValueError, match="segments exceed"):
        graph.fill([(0, 1), (1, 1), (2, 1)], 4)  # + the padding segment = 4 > 3
    with pytest.raises(ValueError, match="cover 9 rows"):
        graph.fill([(0, 9)], 8)
    graph.fill([(None, 1), (0, 2)], 4)
    assert graph.seg_starts.tolist() == [0, 1, 3, 4] and graph.seg_slots.tolist() == [-1, 0, -1]
    assert graph.for_rows(4).row_slots.tolist() == [-1, 0, 0, -1]


def test_dropped_slot_is_zero_in_the_stacks_it_left():
    config = tiny_config()
    model = random_model(config, seed=0)
    names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(2, "cpu", torch.float32, names, tie_word_embeddings=False)
    slots.write(1, "a", make_delta(model, 4, 1, with_dense=True))
    slots.drop(1)
    by_name = [stack for stacks in slots.stacks_by_name().values() for stack in stacks]
    assert len(by_name) > 1 and slots.stacks() == by_name  # the flat snapshot the kernel warm-up walks
    for stack in slots.stacks():
        part = stack.parts["scales" if "scales" in stack.parts else "delta"]
        assert not part[1].any()


def test_segments_hint_is_a_power_of_two_bucket_of_delta_segments():
    hint = GraphDeltaOps.segments_hint_for
    assert hint([(None, 4)]) == 1  # base rows only
    assert hint([(0, 3)]) == 1
    assert hint([(0, 3), (None, 2), (1, 1)]) == 2
    assert hint([(i, 1) for i in range(3)]) == 4
    assert hint([(i, 1) for i in range(8)] + [(None, 8), (9, 0)]) == 8  # empty segments do not count
    assert hint([(i, 1) for i in range(9)]) == 16
