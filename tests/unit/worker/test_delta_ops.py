"""StepDeltaOps: per-row deltas equal running each row through its merged weights."""

import pytest
import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots

H, V, OUT = 8, 11, 6
LIN = "model.layers.0.mlp.up_proj"


def dense(name, t):
    return DeltaTensor(name=name, kind="dense", shape=tuple(t.shape), delta=t.half())


def make_slots(gen, tied=True):
    slots = DeviceSlots(3, "cpu", torch.float32, {LIN + ".weight", "lm_head.weight"}, tie_word_embeddings=tied)
    deltas = {}
    for slot in (0, 2):
        d = {
            LIN + ".weight": torch.randn(OUT, H, generator=gen) * 0.1,
            "model.norm.weight": torch.randn(H, generator=gen) * 0.1,
            "model.embed_tokens.weight": torch.randn(V, H, generator=gen) * 0.1,
        }
        d = {k: v.half().float() for k, v in d.items()}  # what fp16 storage keeps
        slots.write(slot, f"ft{slot}", {k: dense(k, v) for k, v in d.items()})
        deltas[slot] = d
    return slots, deltas


def test_linear_norm_embedding_match_merged_weights():
    gen = torch.Generator().manual_seed(0)
    slots, deltas = make_slots(gen)
    rows = [(None, 2), (0, 3), (2, 1)]
    owners = [None, None, 0, 0, 0, 2]
    ops = StepDeltaOps(slots, rows)
    x = torch.randn(6, H, generator=gen)
    w = torch.randn(OUT, H, generator=gen)
    y = x @ w.T
    ops.linear(LIN, x, y)
    norm_w = torch.randn(H, generator=gen)
    per_row = ops.norm_weight("model.norm", norm_w, x)
    ids = torch.randint(0, V, (6,), generator=gen)
    emb = torch.randn(V, H, generator=gen)
    h = emb[ids].clone()
    ops.embedding("model.embed_tokens", ids, h)
    x_head = torch.randn(6, H, generator=gen)
    logits = x_head @ emb.T
    ops.linear("lm_head", x_head, logits)  # tied: lm_head delta = embed delta
    for i, slot in enumerate(owners):
        d = deltas.get(slot, {})
        zero = torch.zeros
        w_i = w + d.get(LIN + ".weight", zero(OUT, H))
        torch.testing.assert_close(y[i], x[i] @ w_i.T)
        torch.testing.assert_close(per_row[i], norm_w + d.get("model.norm.weight", zero(H)))
        emb_i = emb + d.get("model.embed_tokens.weight", zero(V, H))
        torch.testing.assert_close(h[i], emb_i[ids[i]])
        torch.testing.assert_close(logits[i], x_head[i] @ emb_i.T)


def test_base_only_rows_change_nothing():
    slots, _ = make_slots(torch.Generator().manual_seed(1))
    ops = StepDeltaOps(slots, [(None, 4)])
    x, y = torch.randn(4, H), torch.zeros(4, OUT)
    ops.linear(LIN, x, y)
    assert not y.any()
    assert ops.norm_weight("model.norm", torch.ones(H), x) is None


def test_packed_and_dense_deltas_of_one_linear_in_one_step():
    from kernels import packing

    gen = torch.Generator().manual_seed(2)
    n, k, bits = 4, 64, 4
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask.view(n, k // 4, 4)[..., :2] = True
    codes = torch.randint(0, 1 << bits, (n, k // 2), generator=gen)
    scales = (torch.rand(n, 1, generator=gen) * 0.01).half()
    packed = DeltaTensor(name=LIN + ".weight", kind="sparse24", shape=(n, k), bits=bits, group_size=None, sym=True,
                         qweight=packing.pack_codes(codes, bits), meta=packing.pack_meta(mask), scales=scales)
    plain = dense(LIN + ".weight", torch.randn(n, k, generator=gen) * 0.1)
    slots = DeviceSlots(3, "cpu", torch.float32, {LIN + ".weight"}, tie_word_embeddings=False)
    slots.write(0, "packed", {LIN + ".weight": packed})
    slots.write(2, "dense", {LIN + ".weight": plain})
    x, y = torch.randn(6, k, generator=gen), torch.zeros(6, n)
    StepDeltaOps(slots, [(2, 2), (None, 1), (0, 3)]).linear(LIN, x, y)
    torch.testing.assert_close(y[:2], x[:2] @ plain.dequantize(torch.float32).T)
    assert not y[2].any()
    torch.testing.assert_close(y[3:], x[3:] @ packed.dequantize(torch.float32).T)
    slots.drop(0)
    slots.write(0, "dense2", {LIN + ".weight": plain})  # the slot is reused by another format
    y2 = torch.zeros(6, n)
    StepDeltaOps(slots, [(2, 2), (None, 1), (0, 3)]).linear(LIN, x, y2)
    torch.testing.assert_close(y2[3:], x[3:] @ plain.dequantize(torch.float32).T)


def packed_delta(gen, n, k, bits, group_size, sym):
    from kernels import packing

    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, keep, True).view(n, k)
    codes = torch.randint(0, 1 << bits, (n, k // 2), generator=gen)
    groups = k // group_size
    scales = (torch.rand(n, groups, generator=gen) * 0.01 + 0.001).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, groups), generator=gen).half()
    return DeltaTensor(name=LIN + ".weight", kind="sparse24", shape=(n, k), bits=bits, group_size=group_size,
                       sym=sym, qweight=packing.pack_codes(codes, bits), meta=packing.pack_meta(mask), scales=scales,
                       zeros=zeros)


@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, True), (2, 64, False), (4, 64, False)])
def test_slot_stacks_are_what_the_kernel_reads(bits, group_size, sym):
    """Our stacked slot tensors through kernels.delta_linear.apply_deltas == our cached CPU path."""
    from kernels.delta_linear import apply_deltas
    from services.worker.linear_backend import _kernel_stack

    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    n, k = 16, 128
    slots = DeviceSlots(3, "cpu", torch.float32, {LIN + ".weight"}, tie_word_embeddings=False)
    for slot in (0, 2):
        slots.write(slot, f"ft{slot}", {LIN + ".weight": packed_delta(gen, n, k, bits, group_size, sym)})
    rows = [(0, 3), (None, 2), (2, 4)]
    x = torch.randn(9, k, generator=gen)
    ours, theirs = torch.randn(9, n, generator=gen), None
    theirs = ours.clone()
    ops = StepDeltaOps(slots, rows)
    ops.linear(LIN, x, ours)
    stack = slots.stack(0, LIN + ".weight")
    apply_deltas(x, theirs, _kernel_stack(stack), ops._starts_tensor(), ops._slots_tensor(tuple(ops.seg_slot)))
    torch.testing.assert_close(ours, theirs)


def test_base_runs_cover_every_row_outside_the_merged_segments_once():
    """merged_linear's base GEMMs: the row ranges between merged segments, none empty, in order."""
    from services.worker.delta_ops import base_runs

    starts = [0, 300, 302, 342, 602, 605]  # segments of 300, 2, 40, 260, 3 rows
    assert base_runs(starts, frozenset({0, 3})) == [(300, 342), (602, 605)]
    assert base_runs(starts, frozenset({0, 1, 2, 3, 4})) == []
    assert base_runs(starts, frozenset({4})) == [(0, 602)]
    assert base_runs(starts, frozenset()) == [(0, 605)]
    assert base_runs([0, 0, 10, 10], frozenset({1})) == []  # empty segments add no empty run


def test_base_runs_join_runs_a_few_merged_rows_apart():
    """Runs at most join_rows merged rows apart take one GEMM over the span (one weight read); farther ones two."""
    from services.worker import delta_ops
    from services.worker.delta_ops import base_runs

    starts = [0, 16, 116, 140, 440, 460]  # base 16, merged 100, delta 24, merged 300, delta 20
    assert base_runs(starts, frozenset({1, 3}), join_rows=0) == [(0, 16), (116, 140), (440, 460)]
    assert base_runs(starts, frozenset({1, 3}), join_rows=100) == [(0, 140), (440, 460)]
    assert base_runs(starts, frozenset({1, 3}), join_rows=300) == [(0, 460)]
    assert base_runs(starts, frozenset({0, 1, 3}), join_rows=300) == [(116, 460)]  # leading merged rows: no run
    assert base_runs(starts, frozenset({0, 1, 3}), join_rows=299) == [(116, 140), (440, 460)]
    assert delta_ops.BASE_JOIN_ROWS > 0  # on by default
    assert base_runs(starts, frozenset({1, 3})) == base_runs(starts, frozenset({1, 3}), delta_ops.BASE_JOIN_ROWS)


def test_a_step_records_whether_some_segment_took_the_dense_route(monkeypatch):
    """`dense_route_used` (the engine's `dense_route` profile phase) turns on once a linear reports a dense-route
    segment (apply_linear returns how many; on CPU none does) and stays on for the rest of the forward."""
    from services.worker import linear_backend

    slots, _ = make_slots(torch.Generator().manual_seed(3))
    ops = StepDeltaOps(slots, [(None, 2), (0, 3)])
    x, y = torch.randn(5, H), torch.zeros(5, OUT)
    ops.linear(LIN, x, y)
    assert not ops.dense_route_used  # the CPU path: no dense route
    reported = iter([1, 0])
    monkeypatch.setattr(linear_backend, "apply_linear", lambda *args: next(reported))
    ops.linear(LIN, x, y)
    ops.linear(LIN, x, y)
    assert ops.dense_route_used
    assert not StepDeltaOps(slots, [(0, 5)]).dense_route_used  # each step starts without


def test_gemm_window_widens_to_a_row_bucket_inside_the_step(monkeypatch):
    """The merged route's GEMMs run on planned row counts (engine row buckets): [a, a + bucket) where it fits,
    else the bucket ending at the step's last row, else the rows themselves; with buckets off, the rows."""
    from services.worker.delta_ops import gemm_window
    from services.worker.engine import model_runner

    monkeypatch.setattr(model_runner, "ROW_BUCKETS", True)
    assert model_runner.row_bucket(300) == 320 and model_runner.row_bucket(260) == 288
    assert gemm_window(0, 300, 605) == (0, 320)
    assert gemm_window(342, 602, 605) == (317, 605)  # 342 + 288 > 605: the bucket ending at row 605
    assert gemm_window(602, 605, 605) == (589, 605)
    assert gemm_window(0, 320, 320) == (0, 320)  # a bucket already
    assert gemm_window(0, 300, 310) == (0, 300)  # the bucket (320) is more than the step has
    monkeypatch.setattr(model_runner, "ROW_BUCKETS", False)
    assert gemm_window(0, 300, 605) == (0, 300)


@pytest.mark.parametrize("case", ["one_stack", "one_missing", "two_formats"])
def test_stack_groups_are_the_same_with_and_without_the_one_stack_shortcut(monkeypatch, case):
    """`_stacks_of` answers from one lookup per slot only when a single stack holds every slot's delta; a slot without
    the tensor, or slots in two formats, take the per-segment grouping. Both give the same groups and products."""
    from services.worker import delta_ops

    gen = torch.Generator().manual_seed(3)
    n, k = 16, 128
    slots = DeviceSlots(4, "cpu", torch.float32, {LIN + ".weight"}, tie_word_embeddings=False)
    for slot in (0, 1, 3):
        if case == "one_missing" and slot == 1:
            slots.write(slot, "norm-only", {"model.norm.weight": dense("model.norm.weight", torch.randn(k) * 0.1)})
        elif case == "two_formats" and slot == 3:
            slots.write(slot, "dense", {LIN + ".weight": dense(LIN + ".weight", torch.randn(n, k, generator=gen))})
        else:
            slots.write(slot, f"ft{slot}", {LIN + ".weight": packed_delta(gen, n, k, 4, 32, True)})
    rows = [(0, 2), (None, 1), (1, 3), (3, 2)]
    x = torch.randn(8, k, generator=gen)
    results = {}
    for fast in (True, False):
        monkeypatch.setattr(delta_ops, "FAST_GROUPS", fast)
        ops = StepDeltaOps(slots, rows)
        groups = ops._stacks_of(LIN + ".weight")
        assert (groups[0][1] is ops._delta_slots) == (fast and case == "one_stack")  # the shortcut, only there
        y = torch.zeros(8, n)
        ops.linear(LIN, x, y)
        results[fast] = (sorted((id(stack), sorted(members)) for stack, members in groups), y)
    assert results[True][0] == results[False][0]
    assert len(results[True][0]) == (2 if case == "two_formats" else 1)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    assert results[True][1][2].abs().sum() == 0  # the base row
