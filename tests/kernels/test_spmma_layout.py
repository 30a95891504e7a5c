"""The one-pass sp4 qweight kernel (kernels/spmma_layout.py `sp4_words_gather`) against its torch reference `sp4_words`,
and `copy_sp4_part` routed through it. CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from kernels import sbmm, spmma_layout
from tests.kernels.packed_factory import random_packed

interp = pytest.mark.skipif(not sbmm.interpreting(), reason="CPU kernel tests run under TRITON_INTERPRET=1")


def _random_words(n: int, w: int, seed: int) -> torch.Tensor:
    """int32 [N, W] over the whole range: about half the words have the high bit set."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (n, w), generator=g, dtype=torch.int64).to(torch.int32)


@interp
@pytest.mark.parametrize("n", [64, 128, 192])
@pytest.mark.parametrize("w", [8, 16, 24])
def test_sp4_words_kernel_matches_the_torch_reorder_bit_for_bit(n, w):
    q = _random_words(n, w, 100 * n + w)
    assert (q < 0).any()
    out = torch.full_like(q, 7)
    assert spmma_layout.sp4_words_gather(q, out=out) is out
    assert torch.equal(out, spmma_layout.sp4_words(q))


@interp
def test_sp4_words_kernel_reads_a_row_and_column_slice_in_place():
    """A [N, W] view of a bigger tensor (row chunk, or columns of a wider one) gives the bytes of its copy."""
    big = _random_words(256, 40, 7)
    view = big[64:192, 8:32]
    assert not view.is_contiguous()
    assert torch.equal(spmma_layout.sp4_words_gather(view), spmma_layout.sp4_words(view.contiguous()))


@interp
def test_sp4_words_kernel_moves_each_nibble_where_the_torch_reorder_does():
    """A single set nibble (every 37th position of a tile) lands alone, where the torch re-order puts it."""
    n, w = 64, 8
    for index in range(0, n * w * 8, 37):
        q = torch.zeros(n * w * 8, dtype=torch.int64)
        q[index] = 0xF
        words = spmma_layout._pack_nibbles(q.to(torch.uint8).reshape(n, w, 8))
        assert torch.equal(spmma_layout.sp4_words_gather(words), spmma_layout.sp4_words(words))


def test_sp4_words_kernel_rejects_shapes_that_do_not_tile():
    with pytest.raises(ValueError, match="multiple of 64"):
        spmma_layout.sp4_words_gather(torch.zeros(32, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        spmma_layout.sp4_words_gather(torch.zeros(64, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        spmma_layout.sp4_words_gather(torch.zeros(64, 8, dtype=torch.int32),
                                out=torch.zeros(64, 16, dtype=torch.int32)[:, :8])


@interp
def test_copy_sp4_part_uses_the_kernel_when_switched_on(monkeypatch):
    """With SP4_WORDS_KERNEL on, qweight goes through the one-pass kernel (one launch, no row chunks) and the
    slot holds pack_sp4's bytes; meta keeps the torch permutation."""
    p = random_packed(320, 256, 4, 128, True, generator=torch.Generator().manual_seed(16))
    want = dict(zip(("qweight", "meta"), spmma_layout.pack_sp4(p["qweight"], p["meta"])))
    calls, kernel = [], spmma_layout.sp4_words_gather

    def gather(src, out):
        calls.append(tuple(src.shape))
        return kernel(src, out=out)

    monkeypatch.setattr(spmma_layout, "SP4_WORDS_KERNEL", True)
    monkeypatch.setattr(spmma_layout, "sp4_words_gather", gather)
    for part in ("qweight", "meta"):
        out = torch.full_like(p[part], -1)
        spmma_layout.copy_sp4_part(part, p[part], out)
        assert torch.equal(out, want[part])
    assert calls == [tuple(p["qweight"].shape)]


def test_copy_sp4_part_keeps_the_torch_path_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(spmma_layout, "SP4_WORDS_KERNEL", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not spmma_layout._sp4_words_kernel_on(torch.device("cpu"))
    monkeypatch.setattr(spmma_layout, "SP4_WORDS_KERNEL", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not spmma_layout._sp4_words_kernel_on(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or sbmm.interpreting(), reason="needs CUDA (compiled kernel)")
@pytest.mark.parametrize("n, w", [(4096, 256), (11008, 256), (4096, 688)])
def test_sp4_words_kernel_on_the_gpu_matches_the_torch_reorder(n, w):
    """The compiled kernel on LLaMA-7B qweight shapes (q/k/v/o, gate/up, down) = the torch re-order, bit for bit."""
    q = _random_words(n, w, n + w).cuda()
    assert torch.equal(spmma_layout.sp4_words_gather(q), spmma_layout.sp4_words(q))
