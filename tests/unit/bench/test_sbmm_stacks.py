"""bench/sbmm_stacks.py: the benchmark's stacks are the layouts it names (CPU; the benchmark itself needs a GPU)."""

import pytest
import torch

from bench.sbmm_stacks import layout_name, variant_label, variant_stack
from kernels import layout, packing, sbmm, spmma_layout


def test_tiled_variant_is_the_row_order_stack_tile_major():
    rows = variant_stack("4", 3, 128, 256, "cpu")
    tiled = variant_stack("4t", 3, 128, 256, "cpu")
    assert layout_name(rows) == "canonical" and layout_name(tiled) == "tiled4" and tiled["tiled"]
    want = layout.tile_packed(rows["qweight"], rows["meta"])
    assert torch.equal(tiled["qweight"], want[0]) and torch.equal(tiled["meta"], want[1])
    assert torch.equal(tiled["scales"], rows["scales"])


@pytest.mark.skipif(not sbmm.interpreting(), reason="the dense2 re-encoder runs on CPU under TRITON_INTERPRET=1")
def test_dense2_variant_holds_the_same_two_bit_deltas():
    rows = variant_stack("2", 2, 64, 256, "cpu")
    dense2 = variant_stack("2d2", 2, 64, 256, "cpu")
    assert layout_name(dense2) == "dense2" and dense2["meta"] is None
    for s in range(2):
        want = packing.dequantize(rows["qweight"][s], rows["scales"][s], None, rows["meta"][s], 2, (64, 256))
        assert torch.equal(layout.dequantize_dense2(dense2["qweight"][s], dense2["scales"][s], (64, 256)), want)
    assert [variant_label(v) for v in ("4t", "4", "2d2", "2")] == ["4bt ", "4b  ", "2bd2", "2b  "]


def test_sp2_variant_is_the_row_order_stack_in_the_sp2_order():
    rows = variant_stack("2", 3, 128, 512, "cpu")
    sp2 = variant_stack("2sp", 3, 128, 512, "cpu")
    assert layout_name(sp2) == "sp2" and sp2["sp2"] and variant_label("2sp") == "2bsp"
    want = spmma_layout.pack_sp2(rows["qweight"], rows["meta"])
    assert torch.equal(sp2["qweight"], want[0]) and torch.equal(sp2["meta"], want[1])
    assert torch.equal(sp2["scales"], rows["scales"])
