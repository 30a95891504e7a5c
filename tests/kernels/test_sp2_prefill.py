"""kernels/sp2_prefill.py: sp2 words expanded per tile + a dense dot, against the torch reference.

CPU: under TRITON_INTERPRET=1 (small shapes; fp32 dots there). GPU (skipped without CUDA; all 12 cases passed on an
H200, session 23): fp16 and bf16 on worker shapes, against the reference and against the SBMM kernel on the same sp2
stack.
"""

import os

import pytest
import torch

from kernels import reference, spmma_layout, sp2_prefill
from tests.kernels.packed_factory import random_packed, stack_packed

CUDA = torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def sp2_case(n: int, k: int, slots: int, group: int | None, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    stack = stack_packed([random_packed(n, k, 2, group, generator=g) for _ in range(slots)])
    stack["sp2_qweight"], stack["sp2_meta"] = spmma_layout.pack_sp2(stack["qweight"], stack["meta"])
    return stack


def run_both(stack, x, y0, starts, slots, n, k, min_rows=1, config=None, device="cpu"):
    """(kernel's y, reference y, segments the kernel ran): the reference runs only the segments the kernel takes."""
    taken = [s if s >= 0 and starts[i + 1] - starts[i] >= min_rows else -1 for i, s in enumerate(slots)]
    want = y0.clone()
    reference.sbmm_reference(x, want, stack["qweight"].to(device), stack["meta"].to(device),
                             stack["scales"].to(device), None, 2, (n, k), torch.tensor(starts), torch.tensor(taken))
    got = y0.clone()
    ran = sp2_prefill.sp2_prefill(x, got, stack["sp2_qweight"].to(device), stack["sp2_meta"].to(device),
                                  stack["scales"].to(device), starts, slots, min_rows, config)
    return got, want, ran


@pytest.mark.skipif(not INTERPRET, reason="CPU path runs under TRITON_INTERPRET=1")
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("segments", [
    ([0, 70], [1]),  # one segment, a partial second block
    ([0, 16, 16, 80, 83], [0, -1, 2, 1]),  # an empty one, no delta, odd sizes
])
def test_matches_reference_on_cpu(group, segments):
    n, k = 128, 512
    stack = sp2_case(n, k, 3, group, seed=5)
    starts, slots = segments
    t = starts[-1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, k, generator=g)
    y0 = torch.randn(t, n, generator=g)
    got, want, ran = run_both(stack, x, y0, starts, slots, n, k, config={"BLOCK_M": 32, "BLOCK_N": 64})
    assert ran == sum(1 for i, s in enumerate(slots) if s >= 0 and starts[i + 1] > starts[i])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not INTERPRET, reason="CPU path runs under TRITON_INTERPRET=1")
def test_min_rows_leaves_short_segments_alone():
    n, k = 64, 256
    stack = sp2_case(n, k, 2, None, seed=9)
    starts, slots = [0, 40, 44], [0, 1]
    x = torch.randn(44, k)
    y0 = torch.zeros(44, n)
    got, want, ran = run_both(stack, x, y0, starts, slots, n, k, min_rows=32, config={"BLOCK_M": 16, "BLOCK_N": 64})
    assert ran == 1
    assert torch.equal(got[40:], y0[40:])  # the 4-row segment is SBMM's
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rejects_what_it_cannot_run():
    stack = sp2_case(64, 256, 2, None, seed=2)
    x, y = torch.zeros(4, 256), torch.zeros(4, 64)
    with pytest.raises(ValueError, match="slot out of range"):
        sp2_prefill.sp2_prefill(x, y, stack["sp2_qweight"], stack["sp2_meta"], stack["scales"], [0, 4], [2])
    with pytest.raises(ValueError, match="do not fit"):
        sp2_prefill.sp2_prefill(torch.zeros(4, 512), torch.zeros(4, 64), stack["sp2_qweight"], stack["sp2_meta"],
                                stack["scales"], [0, 4], [0])
    assert sp2_prefill.row_blocks([0, 10, 10, 75], [1, 0, -1], 32) == [0, 10, 1]
    assert sp2_prefill.row_blocks([0, 70], [3], 32) == [0, 32, 3, 32, 64, 3, 64, 70, 3]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("group", [None, 128])
def test_matches_reference_and_sbmm_on_gpu(dtype, shape, group):
    from kernels import sbmm

    n, k = shape
    stack = sp2_case(n, k, 3, group, seed=n + k)
    starts, slots = [0, 128, 131, 131, 400], [2, 0, 1, 0]
    t = starts[-1]
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(t, k, device="cuda", dtype=dtype, generator=g)
    y0 = torch.randn(t, n, device="cuda", dtype=dtype, generator=g)
    got, want, _ = run_both(stack, x, y0, starts, slots, n, k, device="cuda")
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    by_sbmm = y0.clone()
    sbmm.sbmm(x, by_sbmm, stack["sp2_qweight"].cuda(), stack["sp2_meta"].cuda(), stack["scales"].cuda(), None,
              torch.tensor(starts, device="cuda"), torch.tensor(slots, device="cuda"), 2, sp2=True)
    torch.testing.assert_close(got, by_sbmm, rtol=tol, atol=tol)


def test_apply_deltas_routes_mid_sized_sp2_segments_to_the_kernel(monkeypatch):
    """apply_deltas with host segments: segments from SP2_PREFILL_ROWS rows up to the dense route's threshold go to
    kernels/sp2_wgmma.py where it runs (never to the slower sp2_prefill), longer ones to the dense route, the rest
    (and the short ones) to one SBMM launch; with too few programs for the launch, SBMM takes them too."""
    from kernels import delta_linear, sbmm
    from kernels.delta_linear import PackedDeltaStack

    calls = {"prefill": [], "wgmma": [], "dense": [], "sbmm": []}
    monkeypatch.setattr(delta_linear, "SP2_PREFILL_ROWS", 64)
    monkeypatch.setattr(delta_linear, "SP2_PREFILL_MIN_PROGRAMS", 2)
    monkeypatch.setattr(sbmm, "dense_rows", lambda device, bits: 1024)
    monkeypatch.setattr(sp2_prefill, "supported", lambda *a: True)
    monkeypatch.setattr(delta_linear.sp2_wgmma, "supported", lambda *a: True)
    monkeypatch.setattr(sp2_prefill, "sp2_prefill",
                        lambda x, y, q, m, s, starts, slots, *a: calls["prefill"].append(list(slots)))
    monkeypatch.setattr(delta_linear.sp2_wgmma, "sp2_wgmma",
                        lambda x, y, q, m, s, starts, slots, *a, **kw: calls["wgmma"].append(list(slots)))
    monkeypatch.setattr(delta_linear, "dense_linear", lambda x, y, stack, slot: calls["dense"].append(slot))
    monkeypatch.setattr(sbmm, "sbmm", lambda x, y, q, m, s, z, st, sl, *a, **kw: calls["sbmm"].append(sl.tolist()))

    class CudaLike(torch.Tensor):  # apply_deltas routes CUDA tensors; this one only says it is one
        @property
        def is_cuda(self):
            return True

    k, n = 256, 64
    stack = PackedDeltaStack.empty(4, (n, k), bits=2, group_size=128, sp2=True)
    starts, slots = [0, 100, 104, 1204, 1300], [1, 2, 3, 0]
    t = starts[-1]
    x = torch.zeros(t, k).as_subclass(CudaLike)
    y = torch.zeros(t, n).as_subclass(CudaLike)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    dense = delta_linear.apply_deltas(x, y, stack, torch.tensor(starts), torch.tensor(slots), check=False,
                                      host_segments=(starts, slots))
    assert calls["wgmma"] == [[1, -1, -1, 0]] and calls["prefill"] == []  # 100 and 96 rows: 2 programs
    assert calls["dense"] == [3] and dense == 1  # 1100 rows
    assert calls["sbmm"] == [[-1, 2, -1, -1]]  # the 4-row segment
    monkeypatch.setattr(delta_linear, "SP2_PREFILL_MIN_PROGRAMS", 3)  # too few programs: SBMM runs them
    calls.update(wgmma=[], dense=[], sbmm=[])
    delta_linear.apply_deltas(x, y, stack, torch.tensor(starts), torch.tensor(slots), check=False,
                              host_segments=(starts, slots))
    assert calls["wgmma"] == [] and calls["dense"] == [3] and calls["sbmm"] == [[1, 2, -1, 0]]
