"""Fused q/k/v and gate/up: one base GEMM over stacked weights (LinearGroup) and one SBMM launch over a fused slot
stack whose members are row ranges (DeviceSlots `fused`), in every stored layout, equal to the separate linears."""

import os

import pytest
import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.model.layers import NamedLinear
from deltazip.model.synthetic import random_model, tiny_config
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots
from services.worker.graph_deltas import GraphDeltaOps
from tests.kernels.packed_factory import random_packed
from tests.unit.worker.test_graph_deltas import make_delta

interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the tile layouts' re-orders and SBMM on CPU tensors need TRITON_INTERPRET=1")

K = 256
GROUP = {"q": (128, 64, 64), "gate": (128, 192)}  # member rows: q/k/v of a GQA layer, gate/up


def _names(model) -> set[str]:
    return {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}


def _packed(name: str, n: int, bits: int, seed: int, sym: bool = True) -> DeltaTensor:
    p = random_packed(n, K, bits, 128, sym, generator=torch.Generator().manual_seed(seed))
    return DeltaTensor(name, "sparse24", (n, K), bits, 128, sym, qweight=p["qweight"], meta=p["meta"],
                       scales=p["scales"], zeros=p["zeros"])


def _group_deltas(bits: int, seed: int, sym: bool = True) -> tuple[dict, dict]:
    """({tensor name: delta} for a q/k/v group, {group name: member names})."""
    members = tuple(f"l.{m}.weight" for m in ("q", "k", "v"))
    deltas = {name: _packed(name, n, bits, seed + i, sym) for i, (name, n) in enumerate(zip(members, GROUP["q"]))}
    return deltas, {"l.qkv.weight": members}


def test_fused_model_equals_the_separate_linears_and_keeps_its_parameters():
    config = tiny_config(num_key_value_heads=2)
    model, fused = random_model(config, seed=0), random_model(config, seed=0)
    names = dict(fused.named_parameters())
    assert fused.fuse_projections() == 2 * config.num_hidden_layers
    assert dict(fused.named_parameters()).keys() == names.keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(fused.named_parameters())[name], p, rtol=0, atol=0)
    attn = fused.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_dense(ids), model.forward_dense(ids), rtol=1e-5, atol=1e-5)
        # a weight copied in (what the swap baseline does) lands in the fused tensor
        attn.v_proj.weight.copy_(torch.zeros_like(attn.v_proj.weight))
        model.layers[0].self_attn.v_proj.weight.zero_()
        torch.testing.assert_close(fused.forward_dense(ids), model.forward_dense(ids), rtol=1e-5, atol=1e-5)
        # a weight replaced (not copied) turns the fused GEMM off instead of reading stale rows
        attn.q_proj.weight = torch.nn.Parameter(torch.zeros_like(attn.q_proj.weight))
        model.layers[0].self_attn.q_proj.weight.zero_()
        torch.testing.assert_close(fused.forward_dense(ids), model.forward_dense(ids), rtol=1e-5, atol=1e-5)
        assert attn.qkv._fused is None and fused.layers[1].self_attn.qkv._fused is not None  # stale copy released
    assert attn.qkv.hf_name == "model.layers.0.self_attn.qkv_proj"
    assert fused.layers[1].mlp.gate_up.hf_name == "model.layers.1.mlp.gate_up_proj"


@pytest.mark.parametrize("layout", ["canonical", "tiled4", "sp4", "sp2", "dense2"])
def test_fused_stack_holds_the_members_stored_parts_as_row_ranges(layout):
    if layout != "canonical" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the tile layouts' re-orders run as Triton kernels on CPU under TRITON_INTERPRET=1")
    bits = 2 if layout in ("sp2", "dense2") else 4
    flags = {"canonical": dict(tiled4=False, sp4=False, dense2=False), "tiled4": dict(tiled4=True, sp4=False),
             "sp4": dict(sp4=True), "sp2": dict(sp2=True, dense2=False), "dense2": dict(dense2=True)}[layout]
    deltas, groups = _group_deltas(bits, seed=3)
    names = set(deltas)
    fused = DeviceSlots(2, "cpu", torch.float32, names, False, fused=groups, **flags)
    plain = DeviceSlots(2, "cpu", torch.float32, names, False, **flags)
    used = fused.write(1, "a", deltas)
    assert used == plain.write(1, "a", deltas)  # the same bytes, counted once
    stack = fused.stack(1, "l.qkv.weight")
    assert stack is not None and stack.layout == layout and stack.shape == (256, K)
    assert [fused.stack(1, n).fused_in for n in deltas] == [stack] * 3
    assert list(fused.stacks_by_name()) == ["l.qkv.weight"]  # member views are not stacks of their own
    for part, t in stack.parts.items():
        want = torch.cat([plain.stack(1, n).parts[part][1] for n in deltas])
        torch.testing.assert_close(t[1], want, rtol=0, atol=0)


@interpreting
def test_step_ops_fused_linear_equals_the_separate_linears_with_unfusable_slots():
    """Slot 0: all three members share a stack (fused); slot 1: k missing; slot 2: v at another width. The fused
    call equals three separate calls on slots that never fuse."""
    deltas, groups = _group_deltas(4, seed=1)
    missing_k = {n: d for n, d in _group_deltas(4, seed=5)[0].items() if ".k." not in n}
    mixed = _group_deltas(4, seed=9)[0]
    mixed["l.v.weight"] = _packed("l.v.weight", 64, 2, 11)
    names = set(deltas)
    fused = DeviceSlots(3, "cpu", torch.float32, names, False, fused=groups)
    plain = DeviceSlots(3, "cpu", torch.float32, names, False)
    for slot, d in enumerate((deltas, missing_k, mixed)):
        fused.write(slot, f"d{slot}", d)
        plain.write(slot, f"d{slot}", d)
    assert [fused.stack(s, "l.qkv.weight") is not None for s in range(3)] == [True, False, False]
    segments = [(1, 2), (None, 1), (0, 3), (2, 2)]
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(2))
    got = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    want = got.clone()
    StepDeltaOps(fused, segments).fused_linear("l.qkv", ["l.q", "l.k", "l.v"], x, got, GROUP["q"])
    ops = StepDeltaOps(plain, segments)
    for name, part in zip(["l.q", "l.k", "l.v"], want.split(list(GROUP["q"]), dim=1)):
        ops.linear(name, x, part)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@interpreting
@pytest.mark.parametrize("graph", [False, True])
def test_fused_model_and_slots_equal_the_unfused_ones_on_a_mixed_batch(graph):
    """A model with fused projections over fused slots (what the worker runs) against the unfused model over
    unfused slots, eager and through GraphDeltaOps; 4-bit tile-major and 2-bit deltas, base rows between them."""
    config = tiny_config(hidden_size=256, intermediate_size=256, head_dim=64, num_key_value_heads=1)
    model, fused_model = random_model(config, seed=0), random_model(config, seed=0)
    fused_model.fuse_projections()
    slots = {}
    for fuse in (False, True):
        s = DeviceSlots(3, "cpu", torch.float32, _names(model), False, tiled4=True,
                        fused=fused_model.fused_tensor_names() if fuse else None)
        s.write(0, "a", make_delta(model, 4, 1, with_dense=True))
        s.write(2, "b", make_delta(model, 2, 2, with_dense=False))
        slots[fuse] = s
    assert {st.layout for n, sts in slots[True].stacks_by_name().items() if "qkv" in n for st in sts} == {"tiled4",
                                                                                                          "canonical"}
    segments = [(2, 2), (None, 1), (0, 3)]
    ids = torch.randint(0, config.vocab_size, (6, 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = model.hidden_dense(ids, deltas=StepDeltaOps(slots[False], segments))
        if graph:
            ops = GraphDeltaOps(slots[True], max_rows=8, max_segments=4)
            ops.fill(segments, 6)
            got = fused_model.hidden_dense(ids, deltas=ops.for_rows(6))
        else:
            got = fused_model.hidden_dense(ids, deltas=StepDeltaOps(slots[True], segments))
        base = model.hidden_dense(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[:2], base[:2])


class _MergingOps:
    """A DeltaOps whose merged_linear takes over the linears in `take` (returning ones, so the take is visible in
    the output) and declines the others; every call is recorded."""

    def __init__(self, take: set[str]):
        self.take, self.calls = take, []

    def merged_linear(self, name, x, weight, bias, members=None, sizes=None):
        self.calls.append((name, tuple(weight.shape), members, sizes))
        return torch.ones(x.shape[0], weight.shape[0]) if name in self.take else None

    def linear(self, name, x, y):
        self.calls.append(("linear", name))

    def fused_linear(self, group, names, x, y, sizes):
        self.calls.append(("fused_linear", group))


def test_linears_and_fused_groups_ask_merged_linear_first_and_fall_back_when_declined():
    """NamedLinear and a fused LinearGroup (on its stacked weight, with its members and sizes) ask
    DeltaOps.merged_linear before the base GEMM: a tensor returned is the output (no base GEMM, no delta call),
    None means base GEMM + delta as before."""
    config = tiny_config(num_key_value_heads=2)
    model = random_model(config, seed=0)
    model.fuse_projections()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    x = torch.randn(3, config.hidden_size)
    qkv_sizes = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
    with torch.no_grad():
        ops = _MergingOps({attn.qkv.hf_name, mlp.down_proj.hf_name})
        q, k, v = attn.qkv(x, ops)
        assert all(torch.equal(t, torch.ones_like(t)) for t in (q, k, v))
        assert [t.shape[1] for t in (q, k, v)] == qkv_sizes
        assert ops.calls == [(attn.qkv.hf_name, (sum(qkv_sizes), config.hidden_size),
                              [m.hf_name for m in attn.qkv.members()], qkv_sizes)]
        down = mlp.down_proj(torch.randn(3, config.intermediate_size), ops)
        assert torch.equal(down, torch.ones_like(down)) and ops.calls[-1][0] == mlp.down_proj.hf_name
        ops = _MergingOps(set())  # declined: the base GEMM and the delta call, as without the hook
        gate, up = mlp.gate_up(x, ops)
        torch.testing.assert_close(gate, torch.nn.functional.linear(x, mlp.gate_proj.weight), rtol=0, atol=0)
        assert [c[0] for c in ops.calls] == [mlp.gate_up.hf_name, "fused_linear"]
        out = attn.o_proj(x, ops)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, attn.o_proj.weight), rtol=0, atol=0)
        assert ops.calls[-2:] == [(attn.o_proj.hf_name, tuple(attn.o_proj.weight.shape), None, None),
                                  ("linear", attn.o_proj.hf_name)]
