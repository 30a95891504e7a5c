"""The prefill path's dense expansion (kernels/sbmm_dequant.py) and the dense route of apply_deltas.

CPU: the kernel's addressing, expansion and selection MMAs, run on the numpy models of the expanders and of
mma.sp (tests/kernels/test_sbmm_spmma.py), rebuild the canonical dequantized rows; the segment routing of
`apply_deltas` (which segments go dense) with the GPU pieces replaced by recorders. GPU (skipped without CUDA):
the kernel against packing.dequantize, and apply_deltas with the dense route against the reference.
"""

import numpy as np
import pytest
import torch

from kernels import delta_linear, packing, reference, sbmm, sbmm_plan, spmma_layout
from kernels.delta_linear import PackedDeltaStack
from tests.kernels.packed_factory import random_packed
from tests.kernels.test_sbmm import TOL, make_case
from tests.kernels.test_sbmm_spmma import G, LANES, T, expand_word, mma_sp


def selection_b(c: int) -> np.ndarray:
    """B registers [32 lanes, 4 regs, 2 halves] of B_c as the kernel builds them (kernels/sbmm_dequant.py
    `_selection`): 1.0 in lanes t = c, register g // 2, half g % 2."""
    b = np.zeros((32, 4, 2))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if t == c:
            b[lane, g // 2, g % 2] = 1.0
    return b


def model_dequant_block(q, m, scales, block_row: int, bits: int, dtype: str) -> np.ndarray:
    """What kernels/sbmm_dequant.py writes for 16-row block R = block_row: [16, K] (before rounding to dtype)."""
    k = q.shape[-1] * 64 // bits
    qf = q.reshape(-1).numpy().view(np.uint32)
    mf = m.reshape(-1).numpy().view(np.uint32)
    s = scales.float().numpy()
    rows = 16 * block_row + G
    out = np.full((16, k), np.nan)
    step = 256 if bits == 2 else 128

    def instr(a, meta, col, selector):
        group = col // (k // s.shape[1])
        for c in range(4):
            d = mma_sp(a, selection_b(c), meta, np.zeros((32, 4)), selector)
            for i in range(4):
                scale = s[rows + 8 * (i >> 1), group]
                out[G + 8 * (i >> 1), col + 8 * T + 2 * c + (i & 1)] = d[:, i] * scale

    for k0 in range(0, k, step):
        if bits == 2:
            at = (block_row // 4) * 2 * k + (block_row % 4) * 128 + 2 * k0 + 4 * LANES  # + u
            for u in range(4):
                a = expand_word(qf[at + u], dtype, bits=2)  # [32, 8 regs, 2]
                instr(a[:, :4], mf[at + u], k0 + 64 * u, 0)
                instr(a[:, 4:], mf[at + u], k0 + 64 * u + 32, 1)
        else:
            words_at = (block_row // 4) * 4 * k + (block_row % 4) * 128 + 4 * k0 + 4 * LANES  # + j
            meta_at = (block_row // 4) * 2 * k + (block_row % 4) * 64 + 2 * k0 + 2 * LANES  # + slot
            for j in range(4):
                instr(expand_word(qf[words_at + j], dtype), mf[meta_at + j // 2], k0 + 32 * j, j % 2)
    return out


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [None, 128, 256])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_selection_mma_model_rebuilds_the_dequantized_rows(bits, group, dtype):
    n, k = 128, 512
    p = random_packed(n, k, bits, group, generator=torch.Generator().manual_seed(bits * 31 + (group or 0)))
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(p["qweight"], p["meta"])
    want = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k)).double().numpy()
    for block_row in (0, 3, 6):
        got = model_dequant_block(q, m, p["scales"], block_row, bits, dtype)
        assert not np.isnan(got).any()  # every dense column written once per row
        np.testing.assert_allclose(got, want[16 * block_row:16 * block_row + 16], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- routing (CPU, the GPU pieces recorded)


def _routing(monkeypatch, threshold, starts, slots, bits=4):
    """delta_linear._dense_segments (apply_deltas' CUDA routing) on CPU tensors: the segments handed to
    dense_linear (rows, slot) and the slots left to the SBMM launch (None: no launch)."""
    dense = []
    monkeypatch.setattr(sbmm, "dense_rows", lambda device, b: threshold)
    monkeypatch.setattr(delta_linear, "dense_linear", lambda x, y, stack, slot: dense.append((x.shape[0], slot)))
    t, k = starts[-1], 256
    stack = PackedDeltaStack.empty(4, (64, k), bits=bits, group_size=128, sp4=bits == 4, sp2=bits == 2)
    seg_slots = torch.tensor(slots, dtype=torch.int32)
    num, left = delta_linear._dense_segments(torch.zeros(t, k), torch.zeros(t, 64), stack, seg_slots, starts, slots)
    assert num == len(dense)  # what apply_deltas returns: the worker's step profile counts it
    return dense, None if left is None else left.tolist()


def test_long_segments_take_the_dense_route_and_leave_the_rest_to_sbmm(monkeypatch):
    dense, left = _routing(monkeypatch, 256, [0, 300, 310, 566, 570], [1, 2, 3, -1])
    assert dense == [(300, 1), (256, 3)]
    assert left == [-1, 2, -1, -1]


def test_no_sbmm_launch_when_every_delta_segment_went_dense(monkeypatch):
    dense, left = _routing(monkeypatch, 100, [0, 100, 104, 300], [0, -1, 2], bits=2)
    assert dense == [(100, 0), (196, 2)]
    assert left is None


@pytest.mark.parametrize("threshold", [None, 10**6])
def test_without_a_threshold_or_below_it_everything_stays_on_sbmm(monkeypatch, threshold):
    dense, left = _routing(monkeypatch, threshold, [0, 300, 600], [0, 1])
    assert dense == [] and left == [0, 1]


def test_the_tables_give_thresholds_for_both_code_widths():
    for device, table in sbmm._configs().items():
        rows = table.get("dense_rows")
        if rows is not None:
            assert set(rows) <= {"2", "4"} and all(v is None or v >= 16 for v in rows.values()), device
    assert sbmm_plan.dense_rows(torch.device("cpu"), 3) is None


# ---------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (192, 512)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_rows_matches_packing_gpu(bits, n, k, group, dtype):
    if bits == 2 and k % 256:
        pytest.skip("sp2 takes K in 256-column steps")
    p = random_packed(n, k, bits, group, generator=torch.Generator().manual_seed(n + k + bits))
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(p["qweight"], p["meta"])
    want = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k)).to(dtype)
    q, m, scales = q.cuda(), m.cuda(), p["scales"].cuda()
    whole = sbmm.dequantize_rows(q, m, scales, bits, k, torch.full((n, k), float("nan"), dtype=dtype, device="cuda"))
    torch.testing.assert_close(whole.cpu(), want, rtol=0, atol=0)
    part = torch.empty(128, k, dtype=dtype, device="cuda")
    sbmm.dequantize_rows(q, m, scales, bits, k, part, row0=64)
    torch.testing.assert_close(part.cpu(), want[64:192], rtol=0, atol=0)
    # with the base weight: base + Δ, summed in fp32 and rounded once
    base = (torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)
    want_sum = (base.float() + packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k))).to(dtype)
    sbmm.dequantize_rows(q, m, scales, bits, k, part, row0=64, base=base.cuda())
    torch.testing.assert_close(part.cpu(), want_sum[64:192], rtol=0, atol=0)


@gpu
def test_dequantize_rows_rejects_what_it_cannot_run():
    p = random_packed(128, 512, 4, None)
    q, m = spmma_layout.pack_sp4(p["qweight"], p["meta"])
    args = (q.cuda(), m.cuda(), p["scales"].cuda(), 4, 512)
    with pytest.raises(ValueError, match="64-row tiles"):
        sbmm.dequantize_rows(*args, torch.empty(32, 512, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="fp16/bf16"):
        sbmm.dequantize_rows(*args, torch.empty(64, 512, dtype=torch.float32, device="cuda"))


@gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 256 * 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_merged_linear_equals_base_gemm_plus_delta_gpu(monkeypatch, bits, dtype, chunk_bytes, bias):
    n, k, t = 1024, 1024, 300
    gen = torch.Generator().manual_seed(bits + 7)
    p = random_packed(n, k, bits, 128, generator=gen)
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(p["qweight"][None], p["meta"][None])
    stack = PackedDeltaStack(qweight=q.cuda(), meta=m.cuda(), scales=p["scales"][None].cuda(), zeros=None, bits=bits,
                             group_size=128, sym=True, shape=(n, k), sp4=bits == 4, sp2=bits == 2)
    weight = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to("cuda", dtype) if bias else None
    x = torch.randn(t, k, generator=gen).to("cuda", dtype)
    monkeypatch.setattr(delta_linear, "DENSE_CHUNK_BYTES", chunk_bytes)  # 256 KiB: 128-row chunks
    out = torch.full((t, n), float("nan"), dtype=dtype, device="cuda")
    delta_linear.merged_linear(x, out, weight, b, stack, 0)
    delta = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k)).cuda()
    want = torch.nn.functional.linear(x.float(), weight.float() + delta, None if b is None else b.float())
    torch.testing.assert_close(out.float(), want, **TOL[dtype])


@gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 256 * 1024])
def test_apply_deltas_dense_route_matches_reference_gpu(monkeypatch, bits, dtype, chunk_bytes):
    n, k = 4096, 1024
    stack, x, y, starts, slots = make_case(n, k, bits, 128, True, dtype, "many", "cuda", seed=11, pad_rows=3)
    starts_l, slots_l = starts.tolist(), slots.tolist()
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    q, m = pack(stack["qweight"], stack["meta"])
    packed = PackedDeltaStack(qweight=q, meta=m, scales=stack["scales"], zeros=None, bits=bits, group_size=128,
                              sym=True, shape=(n, k), sp4=bits == 4, sp2=bits == 2)
    lengths = sorted(b - a for a, b in zip(starts_l, starts_l[1:]))
    monkeypatch.setattr(sbmm, "dense_rows", lambda device, b: lengths[len(lengths) // 2])  # about half go dense
    monkeypatch.setattr(delta_linear, "DENSE_CHUNK_BYTES", chunk_bytes)  # 256 KiB: 128-row chunks
    y_dense, y_ref = y.clone(), y.clone()
    delta_linear.apply_deltas(x, y_dense, packed, starts.cpu(), slots.cpu(), host_segments=(starts_l, slots_l))
    reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                             starts.cpu(), slots.cpu())
    tol = dict(TOL[dtype])
    tol["atol"] *= 3
    torch.testing.assert_close(y_dense.float(), y_ref.float(), **tol)
    torch.testing.assert_close(y_dense[-3:], y[-3:])
