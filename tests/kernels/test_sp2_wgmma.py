"""kernels/sp2_wgmma.py: Δ by selection MMAs straight into warpgroup-MMA A registers.

CPU: the kernel's addressing, its selection matrices B_p and the placement of each lane's four outputs in the A
operand (the DotOperandLayout's register and lane bits, as `gl.to_linear_layout` reports them for NVMMA v3,
k_width 2), run on the numpy models of the sp2 word expander and of mma.sp (tests/kernels/test_sbmm_spmma.py),
rebuild the canonical dequantized rows. GPU (Hopper only, skipped elsewhere): the kernel against the reference.
"""

import numpy as np
import pytest
import torch

from kernels import packing, reference, spmma_layout
from tests.kernels.packed_factory import random_packed, stack_packed
from tests.kernels.test_sbmm_spmma import G, LANES, T, expand_word, mma_sp


def selection_b(p: int) -> np.ndarray:
    """B registers [32 lanes, 4 regs, 2 halves] of B_p as the kernel builds them: 1.0 in register p, half g % 2,
    of lanes t = g // 2 (B_p[k, n] = 1 where k = n + 8p)."""
    b = np.zeros((32, 4, 2))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        if t == g // 2:
            b[lane, p, g % 2] = 1.0
    return b


def model_block(q, m, scales, block_row: int, dtype: str) -> np.ndarray:
    """The A operand values the kernel's warp block_row % 4 of 64-row block block_row // 4 makes over all K: [16, K]
    (scaled, before rounding), each lane's pack p output i at row g + 8 (i >> 1), column 32j + 2t + (i & 1) + 8p."""
    k = q.shape[-1] * 32
    qf = q.reshape(-1).numpy().view(np.uint32)
    mf = m.reshape(-1).numpy().view(np.uint32)
    s = scales.float().numpy()
    rows = 16 * block_row + G
    out = np.full((16, k), np.nan)
    for k0 in range(0, k, 256):
        at = (block_row // 4) * 2 * k + (block_row % 4) * 128 + 2 * k0 + 4 * LANES  # + j // 2, words and meta
        for j in range(8):
            a = expand_word(qf[at + j // 2], dtype, bits=2)[:, 4 * (j % 2):4 * (j % 2) + 4]
            col0 = k0 + 32 * j
            group = col0 // (k // s.shape[1])
            for p in range(4):
                d = mma_sp(a, selection_b(p), mf[at + j // 2], np.zeros((32, 4)), j % 2)
                for i in range(4):
                    out[G + 8 * (i >> 1), col0 + 2 * T + (i & 1) + 8 * p] = d[:, i] * s[rows + 8 * (i >> 1), group]
    return out


@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_selection_into_a_registers_rebuilds_the_dequantized_rows(group, dtype):
    n, k = 128, 512
    p = random_packed(n, k, 2, group, generator=torch.Generator().manual_seed(7 + (group or 0)))
    q, m = spmma_layout.pack_sp2(p["qweight"], p["meta"])
    want = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 2, (n, k)).double().numpy()
    for block_row in (0, 3, 5):
        got = model_block(q, m, p["scales"], block_row, dtype)
        assert not np.isnan(got).any()  # every column of every row made once
        np.testing.assert_allclose(got, want[16 * block_row:16 * block_row + 16], rtol=1e-6, atol=0)


@pytest.mark.parametrize("warpgroups", [1, 2])
def test_a_operand_layout_is_what_the_placement_assumes(capfd, monkeypatch, warpgroups):
    """The register and lane bits of the A operand's layout (what the model above places by), and its warps: warp w
    holds rows 16w..16w + 15 (so warpgroup w the 64-row block w of the pipelined kernel's program); compiled for
    sm_90 here, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    @gluon.jit
    def probe(out_ptr, BM: gl.constexpr, WG: gl.constexpr):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                      instr_shape=[16, BM, 16])
        gl.static_print(gl.to_linear_layout(gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                                            [64 * WG, 32]))

    monkeypatch.setenv("TRITON_ALWAYS_COMPILE", "1")  # the layout prints while compiling; a cached one prints nothing
    src = GluonASTSource(fn=probe, signature={"out_ptr": "*fp32", "BM": "constexpr", "WG": "constexpr"},
                         constexprs={"BM": 128, "WG": warpgroups})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4 * warpgroups})
    text = capfd.readouterr().out
    assert "reg_bases=[[0, 1], [8, 0], [0, 8], [0, 16]]" in text
    assert "lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]" in text
    assert "warp_bases=" + str([[16 << i, 0] for i in range(2 + warpgroups - 1)]) in text


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def gpu_case(n: int, k: int, group, seed: int):
    """Three 2-bit sp2 deltas, segments [0, 128, 131, 131, 400] on slots [2, 0, 1, 0] (an empty one, odd sizes),
    fp16 x and y on the GPU; (x, y0, what the reference makes of y0, sp2 words, meta, scales, starts, slots)."""
    g = torch.Generator().manual_seed(n + k + seed)
    stack = stack_packed([random_packed(n, k, 2, group, generator=g) for _ in range(3)])
    q, m = spmma_layout.pack_sp2(stack["qweight"], stack["meta"])
    starts, slots = [0, 128, 131, 131, 400], [2, 0, 1, 0]
    gen = torch.Generator(device="cuda").manual_seed(3 + seed)
    x = torch.randn(starts[-1], k, device="cuda", dtype=torch.float16, generator=gen)
    y0 = torch.randn(starts[-1], n, device="cuda", dtype=torch.float16, generator=gen)
    want = y0.clone()
    reference.sbmm_reference(x, want, stack["qweight"].cuda(), stack["meta"].cuda(), stack["scales"].cuda(), None, 2,
                             (n, k), torch.tensor(starts), torch.tensor(slots))
    return x, y0, want, q.cuda(), m.cuda(), stack["scales"].cuda(), starts, slots


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("shape", [(4096, 4096), (12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("block_m,stages,f16_select,warpgroups,prefetch", [
    (64, 3, True, 1, 0), (64, 4, False, 1, 1), (128, 4, True, 1, 2), (64, 3, True, 2, 1), (128, 3, True, 2, 2),
    (64, 4, True, 4, 1)])
def test_matches_reference_on_gpu(shape, group, block_m, stages, f16_select, warpgroups, prefetch):
    from kernels import sp2_wgmma

    x, y0, want, q, m, scales, starts, slots = gpu_case(*shape, group, 0)
    got = y0.clone()
    assert sp2_wgmma.sp2_wgmma(x, got, q, m, scales, starts, slots, block_m, stages=stages, f16_select=f16_select,
                               warpgroups=warpgroups, prefetch=prefetch) == 3
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("shape", [(4096, 4096), (12288, 4096), (4096, 11008)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("block_m,x_stages,a_stages", [(128, 3, 2), (128, 3, 3), (64, 4, 2)])
def test_warp_specialized_matches_reference_on_gpu(shape, group, block_m, x_stages, a_stages):
    """kernels/sp2_wgmma_ws.py against the reference, as the test above (one program a tile: these launches have
    enough tiles)."""
    from kernels import sp2_wgmma_ws

    x, y0, want, q, m, scales, starts, slots = gpu_case(*shape, group, 1)
    got = y0.clone()
    assert sp2_wgmma_ws.sp2_wgmma_ws(x, got, q, m, scales, starts, slots, block_m, a_stages=a_stages,
                                     x_stages=x_stages) == 3
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("split", [2, 3, 8])
def test_warp_specialized_split_k_matches_reference_on_gpu(shape, group, split):
    """Split along K (fp16 atomic adds into y; 3 divides neither 32 nor 86 chunks, so the parts are uneven and
    start mid-group and mid-step) against the reference."""
    from kernels import sp2_wgmma_ws

    x, y0, want, q, m, scales, starts, slots = gpu_case(*shape, group, 2)
    got = y0.clone()
    assert sp2_wgmma_ws.sp2_wgmma_ws(x, got, q, m, scales, starts, slots, split=split) == 3
    torch.testing.assert_close(got, want, rtol=2e-2, atol=3e-2)


def test_split_k_fills_the_waves():
    from kernels.sp2_wgmma_ws import split_k

    assert split_k(32, 4096, 132) == 4  # o / down, one 128-row block: 32 tiles
    assert split_k(64, 4096, 132) == 2
    assert split_k(96, 4096, 132) == 1  # q/k/v: one wave already
    assert split_k(192, 4096, 132) == 2  # two waves, the second 45% full: three of half the length
    assert split_k(576, 4096, 132) == 1
    assert split_k(32, 512, 132) == 1  # 4 chunks: too few to split
    assert split_k(8, 11008, 132) == 8  # 86 chunks: powers of two with at least 8 each


def test_warp_specialized_kernel_compiles_for_sm90():
    """The warp-specialized kernel builds for sm_90 here (no GPU), its partitions resizing their registers
    (USETMAXREG in the SASS)."""
    import os
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/sbmm_sass.py", "--kernel", "sp2ws", "--bm", "128", "--k", "512",
                          "--group", "128", "--dtype", "fp16", "--bn", "128"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": "."}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"USETMAXREG:\d+", out.stdout), out.stdout
