"""DeviceSlots' opt-in sp2 stacks (2-bit symmetric 2:4 deltas in the 2-bit sparse-MMA order of
kernels/spmma_layout.py `pack_sp2`): forced on CPU slots here, so the bytes, the fallbacks and the products are
checked through the CPU path (which reads sp2 words back in row order)."""

import pytest
import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from kernels import sbmm, spmma_layout
from services.worker.device_slots import DeviceSlots
from tests.kernels.packed_factory import random_packed
from tests.unit.worker.test_device_slots_layouts import NAME, _dense_2bit, _packed, _products

SHAPE = (128, 512)


def _sp2_able(seed: int, group: int | None = 128, shape: tuple[int, int] = SHAPE, sym: bool = True) -> DeltaTensor:
    p = random_packed(*shape, 2, group, sym, generator=torch.Generator().manual_seed(seed))
    return DeltaTensor(NAME, "sparse24", shape, 2, group, sym, **{k: p[k] for k in ("qweight", "meta", "scales",
                                                                                    "zeros")})


def _write_all(slots: DeviceSlots, deltas: dict) -> dict[int, str]:
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    return {slot: slots.stack(slot, NAME).layout for slot in deltas}


def test_two_bit_symmetric_deltas_in_sp2_stacks_give_the_canonical_products():
    """With sp2 on, 2-bit symmetric 2:4 deltas with scales per row or per 128 columns land in the sp2 order (bytes as
    pack_sp2 writes them) and multiply as their canonical form does; asymmetric ones and groups of 32 columns keep
    the layouts they have today (canonical here: dense2 is off), and a 4-bit delta is untouched."""
    deltas = {0: _sp2_able(1), 1: _sp2_able(2, group=None), 2: _sp2_able(3, sym=False), 3: _packed(2, 4, SHAPE),
              4: _packed(4, 5, SHAPE)}
    slots = DeviceSlots(5, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, sp2=True)
    layouts = _write_all(slots, deltas)
    assert layouts == {0: "sp2", 1: "sp2", 2: "canonical", 3: "canonical", 4: "canonical"}
    assert slots.stack(0, NAME).sp2 and not slots.stack(3, NAME).sp2
    for slot in (0, 1):
        parts = slots.stack(slot, NAME).parts
        qweight, meta = spmma_layout.pack_sp2(deltas[slot].qweight, deltas[slot].meta)
        assert torch.equal(parts["qweight"][slot], qweight) and torch.equal(parts["meta"][slot], meta)
        assert not torch.equal(parts["qweight"][slot], deltas[slot].qweight)
    y, want = _products(slots, deltas, [(1, 2), (0, 3), (None, 1), (2, 1), (3, 2), (4, 1)], SHAPE[1])
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not sbmm.interpreting(), reason="the dense2 re-encode is a Triton kernel: on CPU it runs under "
                    "TRITON_INTERPRET=1 (as make test sets it)")
def test_sp2_goes_ahead_of_dense2_only_where_it_applies():
    """Both on: an sp2-able delta goes sp2; K % 256 != 0, groups of 32 columns and dense-quantized 2-bit deltas (no
    meta) stay dense2; sp2 off: the sp2-able delta goes dense2 as today."""
    deltas = {0: _sp2_able(6), 1: _sp2_able(7, shape=(128, 384)), 2: _packed(2, 8, SHAPE), 3: _dense_2bit(9)}
    slots = DeviceSlots(4, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, dense2=True, sp2=True)
    assert _write_all(slots, deltas) == {0: "sp2", 1: "dense2", 2: "dense2", 3: "dense2"}
    y, want = _products(slots, {0: deltas[0], 2: deltas[2]}, [(0, 2), (2, 3)], SHAPE[1])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    off = DeviceSlots(1, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, dense2=True)
    assert _write_all(off, {0: deltas[0]}) == {0: "dense2"}


def test_sp2_stacks_fill_unwritten_meta_with_a_valid_pattern_and_a_dropped_slot_adds_nothing():
    """Never-written sp2 slots hold meta 0x44444444 (valid mma.sp metadata under scales 0); a dropped slot's scales
    are zeroed so a kernel over the stack adds nothing for it."""
    slots = DeviceSlots(2, "cpu", torch.float16, {NAME}, tie_word_embeddings=False, sp2=True)
    slots.write(1, "d", {NAME: _sp2_able(10)})
    stack = slots.stack(1, NAME)
    assert stack.layout == "sp2" and torch.all(stack.parts["meta"][0] == 0x44444444)
    assert torch.all(stack.parts["scales"][0] == 0)
    slots.drop(1)
    assert torch.all(stack.parts["scales"][1] == 0) and slots.stack(1, NAME) is None


def test_sp2_is_off_by_default_and_needs_the_sparse_mma_device_on_cuda(monkeypatch):
    """Default: 2-bit 2:4 deltas never go sp2; a CUDA device without the sparse-MMA kernel ignores sp2=True."""
    default = DeviceSlots(1, "cpu", torch.float32, {NAME}, tie_word_embeddings=False)
    assert _write_all(default, {0: _sp2_able(11)}) == {0: "canonical"}
    assert not DeviceSlots(1, "cpu", torch.float32, {NAME}, tie_word_embeddings=False)._sp2
    monkeypatch.setattr(sbmm, "spmma_device_ok", lambda device, dtype: False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    assert not DeviceSlots(1, "cuda", torch.float16, {NAME}, tie_word_embeddings=False, sp2=True)._sp2


def test_copy_sp2_part_writes_pack_sp2_in_row_chunks(monkeypatch):
    """The slot write re-orders qweight and meta separately, a few 64-row blocks at a time: the bytes of pack_sp2."""
    p = random_packed(320, 512, 2, 128, True, generator=torch.Generator().manual_seed(12))
    monkeypatch.setattr(spmma_layout, "SP2_KERNELS", False)  # the torch fallback (tests/kernels covers the kernels)
    monkeypatch.setattr(spmma_layout, "CHUNK_CODES", 128 * 16 * 16)  # two row blocks per chunk, the last alone
    want = spmma_layout.pack_sp2(p["qweight"], p["meta"])
    for part, expect in zip(("qweight", "meta"), want):
        out = torch.full_like(p[part], -1)
        spmma_layout.copy_sp2_part(part, p[part], out)
        assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="sp2"):
        spmma_layout.copy_sp2_part("qweight", p["qweight"][:, :4], torch.empty_like(p["qweight"][:, :4]))
