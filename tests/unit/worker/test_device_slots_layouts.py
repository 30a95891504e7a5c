"""The device-side layouts of kernels/layout.py that DeviceSlots writes at load: dense2 stacks (2-bit symmetric
deltas, 2:4 or dense, held as dense 2-bit words) and tiled4 stacks (4-bit 2:4 words and meta in tile-major order).
On CUDA slots both are automatic; here they are forced on CPU slots so the stacks and the re-encoding are checked
through the CPU path (which dequantizes dense2 words and reads tiled4 words back in row order)."""

import pytest
import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from kernels import layout, packing, sbmm, spmma_layout
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots
from tests.kernels.packed_factory import random_packed

N, K, GROUP = 64, 256, 32
NAME = "layer.weight"


def _packed(bits: int, seed: int, shape: tuple[int, int] = (N, K), sym: bool = True) -> DeltaTensor:
    p = random_packed(*shape, bits, GROUP, sym, generator=torch.Generator().manual_seed(seed))
    return DeltaTensor(NAME, "sparse24", shape, bits, GROUP, sym, qweight=p["qweight"], meta=p["meta"],
                       scales=p["scales"], zeros=p["zeros"])


def _products(slots: DeviceSlots, deltas: dict, segments: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y from the slots' CPU path, y from dequantizing each delta) for x of len(segment rows) rows."""
    x = torch.randn(sum(rows for _, rows in segments), k, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(x.shape[0], deltas[next(iter(deltas))].shape[0])
    StepDeltaOps(slots, segments).linear("layer", x, y)
    want = torch.zeros_like(y)
    row = 0
    for slot, rows in segments:
        if slot is not None:
            want[row:row + rows] = x[row:row + rows] @ deltas[slot].dequantize(torch.float32).T
        row += rows
    return y, want


def _dense_2bit(seed: int) -> DeltaTensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g)
    scales = (torch.rand(N, K // GROUP, generator=g) * 0.01 + 1e-3).half()
    return DeltaTensor(NAME, "quant", (N, K), 2, GROUP, True, qweight=packing.pack_codes(codes, 2), scales=scales)


@pytest.mark.skipif(not sbmm.interpreting(), reason="the dense2 re-encode is a Triton kernel: on CPU it runs under "
                    "TRITON_INTERPRET=1 (as make test sets it)")
def test_two_bit_deltas_in_dense2_stacks_give_the_canonical_products():
    deltas = {0: _packed(2, 1), 1: _dense_2bit(2), 2: _packed(4, 3)}
    slots = DeviceSlots(3, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, dense2=True)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    layouts = {slot: slots.stack(slot, NAME).layout for slot in deltas}
    assert layouts == {0: "dense2", 1: "dense2", 2: "canonical"}
    assert "meta" not in slots.stack(0, NAME).parts and slots.stack(0, NAME) is not slots.stack(1, NAME)
    y, want = _products(slots, deltas, [(0, 2), (None, 1), (1, 2), (2, 1)], K)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(128, 256), (64, 1024)])
def test_four_bit_deltas_in_tiled4_stacks_give_the_canonical_products(shape):
    """4-bit 2:4 deltas (symmetric and not) land tile-major, bytes as layout.tile_packed writes them, and multiply
    as their canonical form does; a 2-bit delta of the same tensor keeps its own (canonical) stack."""
    n, k = shape
    deltas = {0: _packed(4, 6, shape), 1: _packed(4, 7, shape, sym=False), 2: _packed(2, 8, shape)}
    slots = DeviceSlots(3, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, tiled4=True)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    layouts = {slot: slots.stack(slot, NAME).layout for slot in deltas}
    assert layouts == {0: "tiled4", 1: "tiled4", 2: "canonical"} and slots.stack(0, NAME).tiled
    for slot in (0, 1):
        parts = slots.stack(slot, NAME).parts
        qweight, meta = layout.tile_packed(deltas[slot].qweight, deltas[slot].meta)
        assert torch.equal(parts["qweight"][slot], qweight) and torch.equal(parts["meta"][slot], meta)
        assert not torch.equal(parts["qweight"][slot], deltas[slot].qweight)
    y, want = _products(slots, deltas, [(1, 3), (0, 2), (None, 1), (2, 2)], k)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)


def test_four_bit_shapes_that_do_not_tile_stay_canonical():
    """N not a multiple of 64 (or K of 128): the delta keeps the canonical row order and still multiplies right."""
    deltas = {0: _packed(4, 9, (96, 256)), 1: _packed(4, 10, (96, 256))}
    slots = DeviceSlots(2, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, tiled4=True)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    stack = slots.stack(0, NAME)
    assert stack.layout == "canonical" and torch.equal(stack.parts["qweight"][0], deltas[0].qweight)
    y, want = _products(slots, deltas, [(0, 2), (1, 3)], 256)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)


def test_cpu_slots_keep_the_canonical_layout_by_default():
    slots = DeviceSlots(1, "cpu", torch.float32, {NAME}, tie_word_embeddings=False)
    slots.write(0, "d", {NAME: _packed(2, 5)})
    assert slots.stack(0, NAME).layout == "canonical" and "meta" in slots.stack(0, NAME).parts
    slots.write(0, "e", {NAME: _packed(4, 11)})
    assert slots.stack(0, NAME).layout == "canonical" and torch.equal(slots.stack(0, NAME).parts["qweight"][0],
                                                                      _packed(4, 11).qweight)


def test_four_bit_symmetric_deltas_in_sp4_stacks_give_the_canonical_products():
    """With sp4 on, a 4-bit symmetric 2:4 delta with scale groups of 128 lands in the sparse-MMA order (bytes as
    spmma_layout.pack_sp4 writes them) and multiplies as its canonical form does; an asymmetric one falls back to tiled4,
    groups of 32 columns (which the sparse-MMA kernel does not take) too, and a 2-bit one stays canonical."""
    shape = (128, 512)
    g = torch.Generator().manual_seed(12)
    p = {group: random_packed(*shape, 4, group, True, generator=g) for group in (128, 32)}
    deltas = {0: DeltaTensor(NAME, "sparse24", shape, 4, 128, True, qweight=p[128]["qweight"], meta=p[128]["meta"],
                             scales=p[128]["scales"]),
              1: _packed(4, 13, shape, sym=False), 2: _packed(4, 14, shape), 3: _packed(2, 15, shape)}
    slots = DeviceSlots(4, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, tiled4=True, sp4=True)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    layouts = {slot: slots.stack(slot, NAME).layout for slot in deltas}
    assert layouts == {0: "sp4", 1: "tiled4", 2: "tiled4", 3: "canonical"} and slots.stack(0, NAME).sp4
    parts = slots.stack(0, NAME).parts
    qweight, meta = spmma_layout.pack_sp4(deltas[0].qweight, deltas[0].meta)
    assert torch.equal(parts["qweight"][0], qweight) and torch.equal(parts["meta"][0], meta)
    assert not torch.equal(parts["qweight"][0], deltas[0].qweight)
    y, want = _products(slots, deltas, [(1, 2), (0, 3), (None, 1), (2, 1), (3, 2)], shape[1])
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-5)


def test_sp4_stacks_fill_unwritten_meta_with_a_valid_pattern_and_cpu_slots_default_off():
    """Slots never written hold meta 0x44444444 (keep columns 0 and 1: valid mma.sp metadata under scales 0), and
    CPU slots never choose sp4 themselves."""
    delta = DeltaTensor(NAME, "sparse24", (64, 256), 4, None, True,
                        **{k: v for k, v in random_packed(64, 256, 4, None, True).items() if k != "zeros"})
    forced = DeviceSlots(2, "cpu", torch.float16, {NAME}, tie_word_embeddings=False, sp4=True)
    forced.write(1, "d", {NAME: delta})
    stack = forced.stack(1, NAME)
    assert stack.layout == "sp4" and torch.all(stack.parts["meta"][0] == 0x44444444)
    default = DeviceSlots(1, "cpu", torch.float16, {NAME}, tie_word_embeddings=False)
    default.write(0, "d", {NAME: delta})
    assert default.stack(0, NAME).layout == "canonical"


def test_copy_sp4_part_writes_pack_sp4_in_row_chunks(monkeypatch):
    """The slot write re-orders qweight and meta separately, a few 64-row blocks at a time: the bytes of pack_sp4."""
    p = random_packed(320, 256, 4, 128, True, generator=torch.Generator().manual_seed(16))
    monkeypatch.setattr(spmma_layout, "CHUNK_CODES", 128 * 8 * 16)  # two row blocks per chunk, the last one alone
    want = spmma_layout.pack_sp4(p["qweight"], p["meta"])
    for part, expect in zip(("qweight", "meta"), want):
        out = torch.full_like(p[part], -1)
        spmma_layout.copy_sp4_part(part, p[part], out)
        assert torch.equal(out, expect)
