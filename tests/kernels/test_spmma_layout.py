"""The one-pass re-order kernels of kernels/spmma_layout.py against their torch references: sp4 qweight
(`sp4_words_gather` vs `sp4_words`), sp2 qweight and meta (`sp2_words_gather` / `sp2_meta_gather` vs `sp2_words` /
`sp2_meta`), and the slot writes `copy_sp4_part` / `copy_sp2_part` routed through them. CPU under TRITON_INTERPRET=1;
the LLaMA-7B shapes on CUDA."""

import pytest
import torch

from kernels import sbmm, spmma_layout
from tests.kernels.packed_factory import random_packed

interp = pytest.mark.skipif(not sbmm.interpreting(), reason="CPU kernel tests run under TRITON_INTERPRET=1")


def _random_words(n: int, w: int, seed: int) -> torch.Tensor:
    """int32 [N, W] over the whole range: about half the words have the high bit set."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (n, w), generator=g, dtype=torch.int64).to(torch.int32)


def _assert_slot_writes(copy_part, p: dict, want: dict) -> None:
    """copy_part (copy_sp4_part / copy_sp2_part) writes each of qweight and meta into a fresh slot as `want`."""
    for part in ("qweight", "meta"):
        out = torch.full_like(p[part], -1)
        copy_part(part, p[part], out)
        assert torch.equal(out, want[part])


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
@pytest.mark.parametrize("gather, reorder", [("sp4_words_gather", "sp4_words"), ("sp2_words_gather", "sp2_words"),
                                             ("sp2_meta_gather", "sp2_meta")])
def test_gather_kernels_read_a_row_and_column_slice_in_place(gather, reorder):
    """A [N, W] view of a bigger tensor (row chunk, or columns of a wider one) gives the bytes of its copy."""
    big = _random_words(256, 40, 7)
    view = big[64:192, 8:32]
    assert not view.is_contiguous()
    assert torch.equal(getattr(spmma_layout, gather)(view), getattr(spmma_layout, reorder)(view.contiguous()))


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
    _assert_slot_writes(spmma_layout.copy_sp4_part, p, want)
    assert calls == [tuple(p["qweight"].shape)]


def test_copy_sp4_part_keeps_the_torch_path_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not spmma_layout._gather_kernels_on(True, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not spmma_layout._gather_kernels_on(False, torch.device("cpu"))
    assert spmma_layout._gather_kernels_on(True, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or sbmm.interpreting(), reason="needs CUDA (compiled kernel)")
@pytest.mark.parametrize("n, w", [(4096, 256), (11008, 256), (4096, 688)])
def test_sp4_words_kernel_on_the_gpu_matches_the_torch_reorder(n, w):
    """The compiled kernel on LLaMA-7B qweight shapes (q/k/v/o, gate/up, down) = the torch re-order, bit for bit."""
    q = _random_words(n, w, n + w).cuda()
    assert torch.equal(spmma_layout.sp4_words_gather(q), spmma_layout.sp4_words(q))


@interp
@pytest.mark.parametrize("n", [64, 128, 192])
@pytest.mark.parametrize("w", [8, 16, 24])
def test_sp2_kernels_match_the_torch_reorder_bit_for_bit(n, w):
    """qweight and meta words (both [N, K/32], K = 256..768) = sp2_words / sp2_meta, written into the given out."""
    x = _random_words(n, w, 100 * n + w + 1)
    assert (x < 0).any()
    for gather, reorder in ((spmma_layout.sp2_words_gather, spmma_layout.sp2_words),
                            (spmma_layout.sp2_meta_gather, spmma_layout.sp2_meta)):
        out = torch.full_like(x, 7)
        assert gather(x, out=out) is out
        assert torch.equal(out, reorder(x))


@interp
def test_sp2_words_kernel_moves_each_field_where_the_torch_reorder_does():
    """A single set 2-bit field (every 37th position of a tile, values 1..3) lands alone, where the torch re-order
    puts it."""
    n, w = 64, 8
    for index in range(0, n * w * 16, 37):
        q = torch.zeros(n * w * 16, dtype=torch.int64)
        q[index] = 1 + index % 3
        words = spmma_layout._pack_crumbs(q.to(torch.uint8).reshape(n, w, 16))
        out = spmma_layout.sp2_words_gather(words)
        assert torch.equal(out, spmma_layout.sp2_words(words)) and out.count_nonzero() == 1


def test_sp2_kernels_reject_shapes_that_do_not_tile():
    for gather in (spmma_layout.sp2_words_gather, spmma_layout.sp2_meta_gather):
        with pytest.raises(ValueError, match="multiple of 64"):
            gather(torch.zeros(32, 8, dtype=torch.int32))
        with pytest.raises(ValueError, match="of 256"):
            gather(torch.zeros(64, 4, dtype=torch.int32))  # K = 128: a 4-bit tile, not an sp2 step
        with pytest.raises(ValueError, match="int32"):
            gather(torch.zeros(64, 8, dtype=torch.int16))
        with pytest.raises(ValueError, match="contiguous"):
            gather(torch.zeros(64, 8, dtype=torch.int32), out=torch.zeros(64, 16, dtype=torch.int32)[:, :8])


@interp
def test_copy_sp2_part_uses_the_kernels_when_switched_on(monkeypatch):
    """With SP2_KERNELS on, qweight and meta each go through their one-pass kernel (one launch each, no row
    chunks) and the slot holds pack_sp2's bytes."""
    p = random_packed(320, 512, 2, 128, True, generator=torch.Generator().manual_seed(17))
    want = dict(zip(("qweight", "meta"), spmma_layout.pack_sp2(p["qweight"], p["meta"])))
    calls = []

    def recording(name, kernel):
        def gather(src, out):
            calls.append((name, tuple(src.shape)))
            return kernel(src, out=out)
        return gather

    monkeypatch.setattr(spmma_layout, "SP2_KERNELS", True)
    monkeypatch.setattr(spmma_layout, "sp2_words_gather", recording("words", spmma_layout.sp2_words_gather))
    monkeypatch.setattr(spmma_layout, "sp2_meta_gather", recording("meta", spmma_layout.sp2_meta_gather))
    _assert_slot_writes(spmma_layout.copy_sp2_part, p, want)
    assert calls == [("words", tuple(p["qweight"].shape)), ("meta", tuple(p["meta"].shape))]


@pytest.mark.parametrize("interpreter, switch", [(False, True), (True, False)])
def test_copy_sp2_part_keeps_the_torch_path_without_the_kernels(monkeypatch, interpreter, switch):
    """On CPU without the interpreter, or with SP2_KERNELS off, the slot write re-orders in torch: same bytes."""
    p = random_packed(128, 256, 2, None, True, generator=torch.Generator().manual_seed(18))
    want = dict(zip(("qweight", "meta"), spmma_layout.pack_sp2(p["qweight"], p["meta"])))

    def no_kernel(src, out):
        raise AssertionError("the kernel ran")

    if interpreter:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(spmma_layout, "SP2_KERNELS", switch)
    monkeypatch.setattr(spmma_layout, "sp2_words_gather", no_kernel)
    monkeypatch.setattr(spmma_layout, "sp2_meta_gather", no_kernel)
    _assert_slot_writes(spmma_layout.copy_sp2_part, p, want)


@pytest.mark.skipif(not torch.cuda.is_available() or sbmm.interpreting(), reason="needs CUDA (compiled kernel)")
@pytest.mark.parametrize("n, w", [(4096, 128), (11008, 128), (4096, 344)])
def test_sp2_kernels_on_the_gpu_match_the_torch_reorder(n, w):
    """The compiled kernels on LLaMA-7B 2-bit qweight / meta shapes [N, K/32] (q/k/v/o, gate/up, down) = the torch
    re-orders, bit for bit."""
    x = _random_words(n, w, n + w + 1).cuda()
    assert torch.equal(spmma_layout.sp2_words_gather(x), spmma_layout.sp2_words(x))
    assert torch.equal(spmma_layout.sp2_meta_gather(x), spmma_layout.sp2_meta(x))
