"""The 2-bit sparse-MMA path (sp2): the layout (kernels/spmma_layout.py pack_sp2) as a permutation that puts every code
and meta half where the kernel's registers want it, and the whole path on the CPU: sp2 words -> per-lane
registers exactly as kernels/sbmm_spmma2.py addresses them -> the numpy model of mma.sp m16n8k32 of
tests/kernels/test_sbmm_spmma.py -> must equal x @ dequant(Δ).T. The GPU tests of the kernel itself against
kernels/reference.py are test_sbmm_spmma.py's (bits 4 and 2).
"""

import numpy as np
import pytest
import torch

from kernels import packing, sbmm, sbmm_spmma, sbmm_spmma2, spmma_layout
from tests.kernels.test_sbmm import make_case
from tests.kernels.test_sbmm_spmma import G, LANES, T, assert_model_matches_dense_product, expand_word, mma_sp


def _random_words(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("n,k", [(64, 256), (128, 512), (192, 768)])
def test_sp2_round_trips_and_keeps_the_bytes(n, k):
    """pack_sp2 is a permutation of the canonical codes and meta halves (same shapes, nothing lost or duplicated)
    that unpack_sp2 undoes exactly, also for slot-stacked tensors."""
    q, m = _random_words((3, n, k // 32), n + k), _random_words((3, n, k // 32), n * k)
    sq, sm = spmma_layout.pack_sp2(q, m)
    assert sq.shape == q.shape and sm.shape == m.shape and sq.dtype == sm.dtype == torch.int32
    assert torch.equal(torch.sort(spmma_layout._crumbs(sq).flatten()).values, torch.sort(spmma_layout._crumbs(q).flatten()).values)
    assert torch.equal(torch.sort(sm.view(torch.int16).flatten()).values,
                       torch.sort(m.view(torch.int16).flatten()).values)
    back_q, back_m = spmma_layout.unpack_sp2(sq, sm)
    assert torch.equal(back_q, q) and torch.equal(back_m, m)
    assert torch.equal(sq[1], spmma_layout.sp2_words(q[1])) and torch.equal(sm[2], spmma_layout.sp2_meta(m[2]))


def test_sp2_puts_each_code_where_the_docstring_says():
    """Canonical kept code q of row r (a lone 3 among zeros) lands in word (b, s, rb, lane 4g + t, u) at field
    8i + 4e + 2hi + h: the half2 A register a_(2hi+h) of mma.sp j = 2u + e, kept slot i."""
    n, k = 128, 512
    w = k // 32
    for r in (0, 9, 77, 127):
        for kept in range(0, k // 2, 13):
            codes = torch.zeros(n, k // 2, dtype=torch.int64)
            codes[r, kept] = 3
            got = spmma_layout._crumbs(spmma_layout.sp2_words(packing.pack_codes(codes, 2))).reshape(-1)
            word, f = divmod(kept, 16)
            grp, i = divmod(f, 2)
            s, j = divmod(word, 8)
            u, e = divmod(j, 2)
            hi, t = divmod(grp, 4)
            b, rb, h, g = r // 64, (r % 64) // 16, (r % 16) // 8, r % 8
            at = ((b * (w // 8) + s) * 512 + rb * 128 + (4 * g + t) * 4 + u) * 16 + 8 * i + 4 * e + 2 * hi + h
            assert int(got[at]) == 3 and int(got.sum()) == 3, (r, kept)


def test_sp2_puts_each_meta_half_where_the_docstring_says():
    """Canonical meta half hh of row r (16 columns) lands in meta word (b, s, rb, lane 4g + t, v), low half for
    row g and high half for row g + 8, with hh = 16s + 4v + t."""
    n, k = 128, 512
    w = k // 32
    halves = torch.arange(n * 2 * w, dtype=torch.int32).to(torch.int16).reshape(n, 2 * w)
    got = spmma_layout.sp2_meta(halves.view(torch.int32)).view(torch.int16).reshape(-1)
    for r in range(0, n, 5):
        for hh in range(2 * w):
            s, rest = divmod(hh, 16)
            v, t = divmod(rest, 4)
            b, rb, h, g = r // 64, (r % 64) // 16, (r % 16) // 8, r % 8
            at = ((b * (w // 8) + s) * 512 + rb * 128 + (4 * g + t) * 4 + v) * 2 + h
            assert int(got[at]) == int(halves[r, hh]), (r, hh)


def test_sp2_rejects_shapes_that_do_not_tile():
    with pytest.raises(ValueError, match="K=128 of 256"):
        spmma_layout.pack_sp2(torch.zeros(64, 4, dtype=torch.int32), torch.zeros(64, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 64"):
        spmma_layout.sp2_words(torch.zeros(32, 8, dtype=torch.int32))
    assert spmma_layout.sp2_format_ok("sparse24", 2, True, (4096, 11008), 128)
    assert not spmma_layout.sp2_format_ok("sparse24", 2, True, (4096, 11008 + 128), 128)  # K % 256
    assert not spmma_layout.sp2_format_ok("sparse24", 2, False, (4096, 4096), 128)
    assert not spmma_layout.sp2_format_ok("sparse24", 4, True, (4096, 4096), 128)
    assert not spmma_layout.sp2_format_ok("sparse24", 2, True, (4096, 4096), 64)


def kernel_tile2(q_sp2, m_sp2, scales, x, block_row: int, dtype: str) -> np.ndarray:
    """What one warp of kernels/sbmm_spmma2.py computes for 16-row block R = block_row and tokens 0..7: [16, 8]
    (scales per 128-column half, its HALF_SCALES path; the other scale modes are the same sums)."""
    k = x.shape[1]
    qf = q_sp2.reshape(-1).numpy().view(np.uint32)
    mf = m_sp2.reshape(-1).numpy().view(np.uint32)
    xp = spmma_layout.sp4_x(x).double().numpy()  # the wrapper hands sp2 the sp4 B order too
    rows = 16 * block_row + G
    acc = np.zeros((32, 4))
    for k0 in range(0, k, 256):
        at = (block_row // 4) * 2 * k + (block_row % 4) * 128 + 2 * k0 + 4 * LANES  # + u, words and meta alike
        for half in range(2):
            part = np.zeros((32, 4))
            for u in (2 * half, 2 * half + 1):
                a = expand_word(qf[at + u], dtype, bits=2)
                for e in range(2):
                    j = 2 * u + e
                    n = 4 * j + np.arange(4)[None, :]  # [1, reg m]: B register n of the step
                    pair = k0 // 2 + 64 * (n // 16) + 16 * T[:, None] + n % 16
                    b = np.stack([xp[G[:, None], 2 * pair], xp[G[:, None], 2 * pair + 1]], axis=-1)
                    part = mma_sp(a[:, 4 * e:4 * e + 4], b, mf[at + u], part, selector=e)
            s = scales[:, (k0 + 128 * half) // (k // scales.shape[1])].float().numpy()
            acc += part * np.stack([s[rows], s[rows], s[rows + 8], s[rows + 8]], axis=1)
    out = np.zeros((16, 8))
    for lane in range(32):
        for i in range(4):
            out[G[lane] + 8 * (i >> 1), 2 * T[lane] + (i & 1)] = acc[lane, i]
    return out


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("group", [None, 128, 256])
def test_mma_sp_model_on_sp2_registers_matches_dense_product(dtype, group):
    assert_model_matches_dense_product(2, 512, group, dtype, 9, spmma_layout.pack_sp2, kernel_tile2)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_expand2_ptx_uses_the_modelled_constants(dtype):
    """The PTX text carries the shifts and magic / zero constants the model above uses (it cannot run the PTX)."""
    ptx, constraints = sbmm_spmma2.expand_ptx(dtype)
    magic, zero = sbmm_spmma2.MAGIC[dtype]
    assert constraints == ",".join(["=r"] * 8 + ["r"]) and str(magic) in ptx and str(0x00030003) in ptx
    assert ptx.count("lop3.b32") == 8 and ptx.count("shr.u32") == 7
    assert all(f"$8, {2 * p};" in ptx for p in range(1, 8))
    assert str(zero if dtype == "f16" else zero | 0x80008000) in ptx
    assert ptx.count("sub.rn.f16x2" if dtype == "f16" else "fma.rn.bf16x2") == 8


# The kernel itself on the GPU: tests/kernels/test_sbmm_spmma.py (its GPU tests take bits 4 and 2).


def test_sp2_path_rejects_what_it_cannot_run():
    """Off CUDA (or 4-bit, or both orders named) the opt-in sp2 path raises instead of guessing."""
    stack, x, y, starts, slots = make_case(64, 256, 2, None, True, torch.float16, "one", "cpu")
    with pytest.raises(ValueError, match="sp2"):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 2, sp2=True)
    with pytest.raises(ValueError, match="sp4 and sp2"):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 2, sp2=True, sp4=True)
    assert sbmm_spmma.STEP_K.value * 2 == sbmm_spmma2.STEP_K.value == spmma_layout.SP2_STEP
