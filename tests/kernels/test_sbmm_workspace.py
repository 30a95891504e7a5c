"""sbmm.Workspace: split-K counters zeroed once and left zeroed by every launch, and one sparse-MMA copy of x for
consecutive launches on the same x (never carried into or out of a CUDA-graph capture)."""

import pytest
import torch

from kernels import reference, sbmm, spmma_layout
from tests.kernels.test_sbmm import TOL, make_case, tile_major

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
SPLIT = dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, min_ctas=10**6)  # as many K splits as the shape allows


def test_counters_start_zeroed_and_grow_keeping_the_old_buffer():
    ws = sbmm.Workspace("cpu", counters=16)
    first = ws.counters(10)
    assert first.dtype == torch.int32 and first.numel() == 16 and not first.any()
    assert ws.counters(16) is first
    grown = ws.counters(100)
    assert grown.numel() == 128 and not grown.any()
    assert ws.counters(50) is grown  # never shrinks
    assert any(t is first for t in ws._retired)  # graphs captured on the old buffer keep pointing at live memory


def test_sp_x_is_one_copy_per_tensor_and_version():
    ws = sbmm.Workspace("cpu")
    x = torch.randn(5, 256, dtype=torch.float16)
    xs = ws.sp_x(x)
    torch.testing.assert_close(xs, spmma_layout.sp4_x(x), rtol=0, atol=0)
    assert ws.sp_x(x) is xs  # q, k, v: the same x, one copy
    other = x.clone()
    assert ws.sp_x(other) is not xs  # another tensor, even with equal values
    x.add_(1)  # written in place: its version moved
    torch.testing.assert_close(ws.sp_x(x), spmma_layout.sp4_x(x), rtol=0, atol=0)
    kept = ws.sp_x(x)
    ws.forget_x()
    assert ws.sp_x(x) is not kept


def test_sp_x_of_inference_tensors_goes_by_identity():
    ws = sbmm.Workspace("cpu")
    with torch.inference_mode():
        x = torch.randn(3, 128, dtype=torch.float16)
        xs = ws.sp_x(x)
        assert ws.sp_x(x) is xs
        assert ws.sp_x(x[:]) is not xs  # a view is another tensor object


def test_workspace_on_another_device_is_rejected():
    stack, x, y, starts, slots = make_case(64, 128, 4, None, True, torch.float32, "one", "cpu")
    if not CUDA:
        pytest.skip("needs a second device type (CUDA)")
    with pytest.raises(ValueError, match="one workspace per device"):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 4,
                  workspace=sbmm.Workspace("cuda"))


def _launch(kind, stack, x, y, starts, slots, bits, ws, config=SPLIT):
    if kind == "sp4" or kind == "sp2":
        pack = spmma_layout.pack_sp4 if kind == "sp4" else spmma_layout.pack_sp2
        q, m = pack(stack["qweight"], stack["meta"])
        sbmm.sbmm(x, y, q, m, stack["scales"], None, starts, slots, bits, config=config, sp4=kind == "sp4",
                  sp2=kind == "sp2", workspace=ws)
    else:  # tiled4 on the Gluon kernel
        read = tile_major(stack)
        sbmm.sbmm(x, y, read["qweight"], read["meta"], read["scales"], None, starts, slots, bits, kernel="gluon",
                  config=dict(config, prefetch=True), tiled=True, workspace=ws)


def _reference(stack, x, y, starts, slots, bits, n, k):
    out = y.clone()
    reference.sbmm_reference(x, out, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                             starts.cpu(), slots.cpu())
    return out


@gpu
@pytest.mark.parametrize("kind,bits,k", [("sp4", 4, 1408), ("sp2", 2, 2816), ("tiled4", 4, 1024)])
def test_split_launches_reuse_zeroed_counters_gpu(kind, bits, k):
    """Five split-K launches on one workspace, each right: the counters are back at zero after every launch."""
    n = 576
    stack, x, y, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "odd", "cuda", seed=7)
    launch = sbmm.plan(x, n, k, bits, k // 128, 128, False, slots.shape[0], config=SPLIT, sp4=kind == "sp4",
                       sp2=kind == "sp2", kernel=None if kind != "tiled4" else "gluon")
    assert launch.splits > 1  # what this test is about
    ws = sbmm.Workspace("cuda")
    want = _reference(stack, x, y, starts, slots, bits, n, k)
    for _ in range(5):
        got = y.clone()
        _launch(kind, stack, x, got, starts, slots, bits, ws)
        torch.testing.assert_close(got.float(), want.float(), **TOL[torch.float16])
        assert not ws.counters(1).any()


@gpu
@pytest.mark.parametrize("kind,bits,k", [("sp4", 4, 1408), ("sp2", 2, 2816)])
def test_graph_records_its_own_x_copy_and_shares_it_gpu(kind, bits, k, monkeypatch):
    """An eager launch on x, then a capture of three launches on the same x object (q, k, v): the capture records
    its own copy of x (not the eager one), the three share it, and replays follow new values written into x."""
    n = 576
    stack, x, y, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "odd", "cuda", seed=9)
    ws = sbmm.Workspace("cuda")
    ys = [y.clone() for _ in range(3)]
    _launch(kind, stack, x, y.clone(), starts, slots, bits, ws)  # eager: keeps a copy of x
    torch.cuda.synchronize()
    copies = []
    real_sp4_x = spmma_layout.sp4_x
    monkeypatch.setattr(spmma_layout, "sp4_x", lambda t: copies.append(t) or real_sp4_x(t))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for out in ys:
            _launch(kind, stack, x, out, starts, slots, bits, ws)
    assert len(copies) == 1  # the capture records one copy of x, shared by its three launches
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        for out in ys:
            out.copy_(y)
        graph.replay()
        want = _reference(stack, x, y, starts, slots, bits, n, k)
        for out in ys:
            torch.testing.assert_close(out.float(), want.float(), **TOL[torch.float16])
    assert not ws.counters(1).any()


def test_worker_delta_ops_drop_the_kept_x_at_each_embedding_and_norm():
    """StepDeltaOps / GraphDeltaOps forget the kept copy of x where a forward starts (embedding) and where the
    linears sharing one input end (every norm), so no activations outlive them."""
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from services.worker.graph_deltas import GraphDeltaOps

    slots = DeviceSlots(2, "cpu", torch.float32, {"model.layers.0.mlp.up_proj.weight"}, False)
    step, graph = StepDeltaOps(slots, [(None, 2)]), GraphDeltaOps(slots, 4, 2)
    x = torch.randn(2, 128)
    for ops in (step, graph):
        ws = sbmm.Workspace("cpu")
        ops._workspace = ws
        for hook in (lambda: ops.embedding("model.embed_tokens", torch.zeros(2, dtype=torch.long),
                                           torch.zeros(2, 8)),
                     lambda: ops.norm_weight("model.norm", torch.ones(8), torch.zeros(2, 8))):
            kept = ws.sp_x(x)
            assert ws.sp_x(x) is kept
            hook()
            assert ws.sp_x(x) is not kept
