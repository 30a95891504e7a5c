"""SBMM kernels vs the torch reference: bits x scale groups x dtype x segment layouts x shapes.

CPU: the portable Triton kernel under TRITON_INTERPRET=1 on small shapes, and the numpy emulation of the
PTX word expander against kernels/packing.py. GPU (skipped without CUDA): the Gluon and Triton kernels
on Llama-2-7B layer shapes.
"""

import numpy as np
import pytest
import torch

from kernels import layout, packing, reference, sbmm, sbmm_asm, sbmm_plan, spmma_layout
from tests.kernels.packed_factory import random_packed, stack_packed

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
interp = pytest.mark.skipif(not sbmm.interpreting(), reason="CPU kernel tests run under TRITON_INTERPRET=1")

# name -> (rows per segment, slot per segment); rows not covered by a segment must stay untouched
SEGMENTS = {
    "one": ([9], [0]),
    "many": ([3, 1, 4, 1, 5, 2], [0, 1, 2, 1, 0, 2]),
    "empty": ([2, 0, 3, 0, 1], [1, 0, 2, 2, -1]),
    "odd": ([17, 33, 5], [2, 0, 1]),
}
TOL = {torch.float16: dict(atol=2e-2, rtol=1e-2), torch.bfloat16: dict(atol=6e-2, rtol=2e-2),
       torch.float32: dict(atol=1e-3, rtol=1e-3)}


def make_case(n, k, bits, group, sym, dtype, layout, device, seed=0, pad_rows=0):
    """Stacked packed deltas (3 slots), x, y and segment tensors for one test case."""
    g = torch.Generator().manual_seed(seed)
    stack = stack_packed([random_packed(n, k, bits, group, sym, generator=g) for _ in range(3)])
    lens, slots = SEGMENTS[layout]
    t = sum(lens) + pad_rows
    starts = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int64)
    x = torch.randn(t, k, generator=g).to(dtype)
    y = torch.randn(t, n, generator=g).to(dtype)
    moved = {key: (v.to(device) if v is not None else None) for key, v in stack.items()}
    return moved, x.to(device), y.to(device), starts.to(device), torch.tensor(slots, dtype=torch.int64).to(device)


def tile_major(stack):
    """The same stacked 4-bit deltas with qweight and meta in tile-major order (what CUDA slots hold)."""
    qweight, meta = layout.tile_packed(stack["qweight"], stack["meta"])
    return {**stack, "qweight": qweight, "meta": meta}


def run_both(stack, x, y, starts, slots, bits, n, k, kernel=None, config=None, tiled=False):
    """y after the kernel (on the tile-major copy of the stack when `tiled`) and after the canonical reference."""
    y_kernel, y_ref = y.clone(), y.clone()
    read = tile_major(stack) if tiled else stack
    sbmm.sbmm(x, y_kernel, read["qweight"], read["meta"], read["scales"], read["zeros"], starts, slots, bits,
              kernel=kernel, config=config, tiled=tiled)
    reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], stack["zeros"], bits,
                             (n, k), starts.cpu(), slots.cpu())
    return y_kernel, y_ref


@interp
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(SEGMENTS))
def test_triton_kernel_matches_reference_cpu(bits, group, dtype, layout):
    n, k = 48, 128
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, layout, "cpu", pad_rows=2)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel="triton", config=cfg)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(y_kernel[-2:], y[-2:])  # rows outside every segment are untouched


@interp
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k,group", [(96, None), (160, 32), (256, 128)])
def test_triton_kernel_odd_k_and_asym_cpu(bits, k, group):
    n = 40  # not a multiple of BLOCK_N: masked rows
    stack, x, y, starts, slots = make_case(n, k, bits, group, False, torch.float32, "many", "cpu", seed=1)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel="triton", config=cfg)
    torch.testing.assert_close(y_kernel, y_ref, **TOL[torch.float32])


TILED_CPU_CONFIGS = (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),  # a K step = one whole [64, 8] block
                     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64),  # a quarter of a block
                     dict(BLOCK_M=8, BLOCK_N=128, BLOCK_K=256))  # two blocks across, two down


@interp
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(SEGMENTS))
def test_triton_kernel_reads_tiled_4bit_words_cpu(group, dtype, layout_name):
    """4-bit words and meta stored tile-major (layout.tile_packed) give the canonical reference's result for
    K steps of whole, partial and several blocks; rows outside every segment stay untouched."""
    n, k = 128, 256
    stack, x, y, starts, slots = make_case(n, k, 4, group, True, dtype, layout_name, "cpu", seed=13, pad_rows=2)
    for cfg in TILED_CPU_CONFIGS:
        y_kernel, y_ref = run_both(stack, x, y, starts, slots, 4, n, k, kernel="triton", config=cfg, tiled=True)
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])
        torch.testing.assert_close(y_kernel[-2:], y[-2:])


@interp
@pytest.mark.parametrize("group", [None, 64])
def test_triton_kernel_reads_tiled_4bit_asym_words_cpu(group):
    n, k = 192, 384
    stack, x, y, starts, slots = make_case(n, k, 4, group, False, torch.float32, "odd", "cpu", seed=14)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, 4, n, k, kernel="triton", config=TILED_CPU_CONFIGS[0],
                               tiled=True)
    torch.testing.assert_close(y_kernel, y_ref, **TOL[torch.float32])


@interp
@pytest.mark.parametrize("n,k", [(96, 256), (128, 160), (40, 96)])
def test_4bit_shapes_that_do_not_tile_keep_row_order_cpu(n, k):
    """N not a multiple of 64 or K not of 128: no tile-major form; the wrapper refuses to read one and the
    row-order stack still matches the reference."""
    assert not layout.tiled4_format_ok("sparse24", 4, (n, k))
    stack, x, y, starts, slots = make_case(n, k, 4, 32, True, torch.float32, "many", "cpu", seed=15)
    with pytest.raises(ValueError, match="tile"):
        layout.tile_packed(stack["qweight"], stack["meta"])
    with pytest.raises(ValueError, match="row order"):
        sbmm.sbmm(x, y.clone(), stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 4,
                  kernel="triton", tiled=True)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, 4, n, k, kernel="triton",
                               config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64))
    torch.testing.assert_close(y_kernel, y_ref, **TOL[torch.float32])


def test_tiled_layout_is_four_bit_only():
    """2-bit 2:4 words keep row order (CUDA slots hold 2-bit symmetric deltas as dense2 words instead)."""
    stack, x, y, starts, slots = make_case(128, 256, 2, None, True, torch.float32, "one", "cpu")
    with pytest.raises(ValueError, match="4-bit"):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 2, tiled=True)
    with pytest.raises(ValueError, match="4-bit"):
        layout.tile_packed(stack["qweight"], stack["meta"])
    ok = layout.tiled4_format_ok
    assert ok("sparse24", 4, (4096, 11008)) and ok("sparse24", 4, (11008, 4096)) and ok("sparse24", 4, (64, 128))
    assert not ok("sparse24", 2, (4096, 4096)) and not ok("quant", 4, (4096, 4096))
    assert not ok("sparse24", 4, (576, 1536 + 32)) and not ok("sparse24", 4, (4096,))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_ptx_expander_emulation_matches_dequantize(bits, asym, dtype):
    """The PTX program, run by the numpy emulator, reproduces packing.dequantize word by word."""
    n, k, group = 16, 512, 128
    p = random_packed(n, k, bits, group, sym=not asym, generator=torch.Generator().manual_seed(2))
    tdt = torch.float16 if dtype == "f16" else torch.bfloat16
    ops, dense = sbmm_asm.build_program(bits, asym)
    q = p["qweight"].numpy().view(np.uint32)
    m = p["meta"].numpy().view(np.uint32)
    m = m.view(np.uint16).astype(np.uint32) if bits == 4 else m  # one meta element per word

    def half2(t):
        u = t.to(tdt).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
        return u | (u << 16)

    word_group = (np.arange(q.shape[1]) * dense) // group
    magic = sbmm_asm.MAGIC_VALUE[dtype]
    inputs = {"q": q, "m": m, "s": half2(p["scales"])[:, word_group]}
    if asym:
        inputs["z"] = np.broadcast_to(half2(torch.tensor(magic)), q.shape)
        inputs["zq"] = half2(p["zeros"])[:, word_group]
    else:
        inputs["z"] = np.broadcast_to(half2(torch.tensor(magic + 2 ** (bits - 1))), q.shape)
    bits16 = sbmm_asm.emulate(ops, dense, dtype, inputs)  # [N, W, dense] by output slot
    width = dense.bit_length() - 1
    order = [sbmm_asm.bitrev(c, width) for c in range(dense)]  # column c sits in slot bitrev(c)
    got = torch.from_numpy(bits16[..., order].astype(np.int16)).view(tdt).reshape(n, k)
    want = packing.dequantize(p["qweight"], p["scales"], p["zeros"], p["meta"], bits, (n, k)).to(tdt)
    if dtype == "f16":
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:  # the kernel rounds the fp16 scale to bf16 before multiplying: at most one bf16 ulp apart
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_dense2_expander_emulation_matches_dequantize(dtype):
    """The dense2 PTX program (kernels/layout.py layout), run by the numpy emulator, reproduces the canonical
    2-bit 2:4 dequantization of the same delta, pruned positions included (code 2 -> 0)."""
    n, k, group = 64, 512, 128
    p = random_packed(n, k, 2, group, sym=True, generator=torch.Generator().manual_seed(3))
    tdt = torch.float16 if dtype == "f16" else torch.bfloat16
    ops, dense = sbmm_asm.build_dense2_program()
    q = layout.untile_words(layout.to_dense2_reference(p["qweight"], p["meta"], k)).numpy().view(np.uint32)

    def half2(t):
        u = t.to(tdt).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
        return u | (u << 16)

    word_group = (np.arange(q.shape[1]) * dense) // group
    inputs = {"q": q, "m": q, "s": half2(p["scales"])[:, word_group],
              "z": np.broadcast_to(half2(torch.tensor(sbmm_asm.MAGIC_VALUE[dtype] + 2)), q.shape)}
    bits16 = sbmm_asm.emulate(ops, dense, dtype, inputs)
    order = [sbmm_asm.bitrev(c, 4) for c in range(dense)]
    got = torch.from_numpy(bits16[..., order].astype(np.int16)).view(tdt).reshape(n, k)
    want = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 2, (n, k)).to(tdt)
    if dtype == "f16":
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_dense2_raw_expander_emulation_gives_unscaled_codes(dtype):
    """The unscaled dense2 program (the kernel scales the accumulator) yields exactly code - 2 for every
    column, in both precisions, and needs at most 2 instructions per value pair (no per-pair shift, no mul)."""
    n, k = 64, 512
    p = random_packed(n, k, 2, 128, sym=True, generator=torch.Generator().manual_seed(5))
    ops, dense = sbmm_asm.build_dense2_raw_program(dtype)
    words = layout.to_dense2_reference(p["qweight"], p["meta"], k)
    q = layout.untile_words(words).numpy().view(np.uint32)
    bits16 = sbmm_asm.emulate(ops, dense, dtype, {"q": q, "m": q, "s": q, "z": q})
    order = [sbmm_asm.bitrev(c, 4) for c in range(dense)]
    tdt = torch.float16 if dtype == "f16" else torch.bfloat16
    got = torch.from_numpy(bits16[..., order].astype(np.int16)).view(tdt).reshape(n, k).float()
    assert torch.equal(got, (layout.unpack_dense2(words, k) - 2).float())
    alu = [op for op in ops if op.kind in ("shr", "lop3", "hsub", "hmul", "prmt")]
    assert len(alu) <= dense + (1 if dtype == "f16" else 2)


@interp
@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (128, 256, None), (64, 1024, 128), (192, 4096, 64)])
def test_dense2_reencode_kernel_matches_reference(n, k, group):
    p = random_packed(n, k, 2, group, sym=True, generator=torch.Generator().manual_seed(n))
    want = layout.to_dense2_reference(p["qweight"], p["meta"], k)
    out = torch.full((n, k // 16), 7, dtype=torch.int32)
    assert layout.to_dense2(p["qweight"], p["meta"], out=out) is out
    assert torch.equal(out, want)
    dense = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 2, (n, k))
    assert torch.equal(layout.dequantize_dense2(out, p["scales"], (n, k)), dense)


@interp
@pytest.mark.parametrize("n,k", [(64, 128), (128, 512), (64, 4096)])
def test_dense_2bit_codes_repack_to_dense2(n, k):
    """Dense (unpruned) 2-bit deltas: the field move of layout.dense_to_dense2 keeps every value."""
    g = torch.Generator().manual_seed(k)
    qweight = packing.pack_codes(torch.randint(0, 4, (n, k), generator=g), 2)
    scales = (torch.rand(n, k // 64, generator=g) * 0.01).half()
    words = layout.dense_to_dense2(qweight)
    assert torch.equal(words, layout.dense_to_dense2_reference(qweight, k))
    want = packing.dequantize(qweight, scales, None, None, 2, (n, k))
    assert torch.equal(layout.dequantize_dense2(words, scales, (n, k)), want)


def test_dense2_words_are_stored_tile_major():
    """Row-order words -> [N/64, K/128, 64, 8] blocks and back; the re-encoders refuse shapes that do not tile."""
    n, k = 128, 512
    rows = torch.arange(n * k // 16, dtype=torch.int32).reshape(n, k // 16)
    tiled = layout.tile_words(rows)
    assert torch.equal(tiled.reshape(-1)[:8], rows[0, :8]) and torch.equal(tiled.reshape(-1)[8:16], rows[1, :8])
    assert torch.equal(tiled.reshape(n // 64, k // 128, 64, 8)[1, 2, 5], rows[64 + 5, 16:24])
    assert torch.equal(layout.untile_words(tiled), rows)
    with pytest.raises(ValueError, match="tiles"):
        layout.dense_to_dense2(torch.zeros(32, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="tiles"):
        layout.to_dense2(torch.zeros(64, 3, dtype=torch.int32), torch.zeros(64, 3, dtype=torch.int32))


def test_4bit_words_and_meta_tile_major_round_trip():
    """tile_packed stores qweight in [N/64, K/128, 64, 8] and meta in [N/64, K/128, 64, 4] blocks; the meta's
    int16 view (what the kernels read, one half per word) is then in the words' own block order, and
    untile_packed restores the canonical row order exactly, also for slot-stacked tensors and into `out`."""
    n, k = 128, 512
    p = random_packed(n, k, 4, 128, generator=torch.Generator().manual_seed(16))
    qweight, meta = layout.tile_packed(p["qweight"], p["meta"])
    assert qweight.shape == p["qweight"].shape and meta.shape == p["meta"].shape
    assert torch.equal(qweight.reshape(2, 4, 64, 8)[1, 2, 5], p["qweight"][64 + 5, 16:24])
    assert torch.equal(meta.reshape(2, 4, 64, 4)[1, 2, 5], p["meta"][64 + 5, 8:12])
    assert torch.equal(meta.view(torch.int16), layout.tile_words(p["meta"].view(torch.int16)))
    back = layout.untile_packed(qweight, meta)
    assert torch.equal(back[0], p["qweight"]) and torch.equal(back[1], p["meta"])
    stacked = stack_packed([p, random_packed(n, k, 4, 128, generator=torch.Generator().manual_seed(17))])
    out = (torch.empty_like(stacked["qweight"]), torch.empty_like(stacked["meta"]))
    tiled = layout.tile_packed(stacked["qweight"], stacked["meta"], out=out)
    assert tiled[0] is out[0] and tiled[1] is out[1] and torch.equal(out[0][0], qweight)
    back = layout.untile_packed(*out)
    assert torch.equal(back[0], stacked["qweight"]) and torch.equal(back[1], stacked["meta"])


def test_dense2_format_ok():
    """Which deltas dense2 words can hold (CUDA slots only: tests/unit/worker/test_device_slots_layouts.py checks
    that CPU slots keep the canonical layout)."""
    ok = layout.dense2_format_ok
    assert ok("sparse24", 2, True, (4096, 4096), 128)
    assert ok("sparse24", 2, True, (4096, 11008), None)
    assert not ok("sparse24", 4, True, (4096, 4096), 128)  # 4-bit: 3 bits per column
    assert not ok("sparse24", 2, False, (4096, 4096), 128)  # asym zero points
    assert not ok("sparse24", 2, True, (576, 576), 64)  # K not a multiple of 128
    assert not ok("sparse24", 2, True, (4160 + 32, 4096), 128)  # N not a multiple of 64 (the word tiles)
    assert ok("quant", 2, True, (4096, 4096), 128)  # dense 2-bit: same words
    assert not ok("quant", 3, True, (4096, 4096), 128)


def test_every_config_entry_ends_with_a_catch_all():
    for device, kernels in sbmm._configs().items():
        assert set(kernels) <= set(sbmm.CONFIG_TABLES) | {"dense_rows"}, device
        for kernel, entries in ((k, e) for k, e in kernels.items() if k in sbmm.CONFIG_TABLES):
            assert entries[-1]["max_rows"] is None and "bits" not in entries[-1], (device, kernel)
            assert "min_n" not in entries[-1] and "min_programs" not in entries[-1], (device, kernel)
            assert sbmm.pick_config(kernel, device, 1e9) == {k: v for k, v in entries[-1].items() if k != "max_rows"}
    assert sbmm.pick_config("gluon", "unknown GPU", 4)["BLOCK_M"] == 8


def test_a_device_named_as_an_alias_picks_what_its_target_picks():
    table = sbmm._configs()
    assert table["NVIDIA H200"] is table["NVIDIA H100 80GB HBM3"]  # measured on an H200 (docs/kernels.md run 23)
    for kernel in ("spmma", "spmma2"):
        for rows, n, segments in ((1, 4096, 8), (4, 12288, 8), (16, 4096, 2), (64, 22016, 1), (512, 4096, 4)):
            assert (sbmm.pick_config(kernel, "NVIDIA H200", rows, 4, n, segments)
                    == sbmm.pick_config(kernel, "NVIDIA H100 80GB HBM3", rows, 4, n, segments))
    own = {"default": {"gluon": [{"max_rows": None, "BLOCK_M": 8}]},
           "A": {"gluon": [{"max_rows": None, "BLOCK_M": 16}]}}
    assert sbmm.pick_config("gluon", "B", 4, table={**own, "B": "A"}) == {"BLOCK_M": 16}  # a passed table too
    for bad in ({**own, "B": "C"}, {**own, "B": "A", "C": "B"}):  # a missing target; an alias of an alias
        with pytest.raises(ValueError, match="not a device with its own tables"):
            sbmm_plan.resolve_aliases(bad, "t.json")


def test_config_entries_can_be_limited_to_a_code_width(monkeypatch):
    table = {"default": {"gluon": [{"max_rows": 8, "bits": [2], "BLOCK_M": 8, "prefetch": False},
                                   {"max_rows": 8, "BLOCK_M": 8, "prefetch": True},
                                   {"max_rows": None, "BLOCK_M": 16, "prefetch": True}]}}
    monkeypatch.setattr(sbmm_plan, "_configs", lambda: table)  # what sbmm.pick_config reads
    assert sbmm.pick_config("gluon", "any", 4, bits=2) == {"BLOCK_M": 8, "prefetch": False}
    assert sbmm.pick_config("gluon", "any", 4, bits=4) == {"BLOCK_M": 8, "prefetch": True}
    assert sbmm.pick_config("gluon", "any", 64, bits=2) == {"BLOCK_M": 16, "prefetch": True}


def test_config_entries_can_be_limited_to_wide_outputs(monkeypatch):
    table = {"default": {"spmma": [{"max_rows": 8, "min_n": 8192, "BLOCK_M": 8},
                                   {"max_rows": None, "BLOCK_M": 16}]}}
    monkeypatch.setattr(sbmm_plan, "_configs", lambda: table)  # what sbmm.pick_config reads
    assert sbmm.pick_config("spmma", "any", 4, 4, n=11008) == {"BLOCK_M": 8}
    assert sbmm.pick_config("spmma", "any", 4, 4, n=4096) == {"BLOCK_M": 16}
    assert sbmm.pick_config("spmma", "any", 4, 4) == {"BLOCK_M": 16}  # no width given: never the min_n entry
    assert sbmm.pick_config("spmma", "any", 16, 4, n=11008) == {"BLOCK_M": 16}


def test_config_entries_can_be_limited_to_launches_with_many_programs(monkeypatch):
    """min_programs counts the entry's own (n-block, tile) programs: ceil(n / BLOCK_N) x segments x
    ceil(rows / BLOCK_M); without n or a segment count such an entry never matches."""
    table = {"default": {"spmma": [{"max_rows": 16, "min_programs": 1024, "BLOCK_M": 16, "BLOCK_N": 128,
                                    "num_warps": 2},
                                   {"max_rows": None, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 2}]}}
    monkeypatch.setattr(sbmm_plan, "_configs", lambda: table)  # what sbmm.pick_config reads
    wide = {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 2}
    narrow = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 2}
    assert sbmm.pick_config("spmma", "any", 16, 4, n=4096, segments=32) == wide  # 32 x 32 x 1
    assert sbmm.pick_config("spmma", "any", 16, 4, n=4096, segments=31) == narrow
    assert sbmm.pick_config("spmma", "any", 16, 4, n=4096 + 129, segments=31) == wide  # 34 x 31 n-blocks
    assert sbmm.pick_config("spmma", "any", 4, 4, n=4096, segments=16) == narrow  # one tile per segment
    assert sbmm.pick_config("spmma", "any", 4, 4, n=4096) == narrow  # no segment count given
    assert sbmm.pick_config("spmma", "any", 32, 4, n=4096, segments=64) == narrow  # past max_rows
    table["default"]["spmma"][0].update(max_rows=64, BLOCK_M=16)  # rows over BLOCK_M: tiles per segment count
    assert sbmm.pick_config("spmma", "any", 48, 4, n=4096, segments=11) == wide  # 32 x 11 x 3 = 1056
    assert sbmm.pick_config("spmma", "any", 32, 4, n=4096, segments=11) == narrow  # 32 x 11 x 2 = 704
    # sbmm.plan counts the call's segments (a segments hint bounds them), as the K split does
    x = torch.zeros(16 * 64, 4096)
    assert sbmm.plan(x, 4096, 4096, 4, 32, 128, False, 64, sp4=True).block_n == 128
    assert sbmm.plan(x, 4096, 4096, 4, 32, 128, False, 64, rows_hint=16, segments_hint=16, sp4=True).block_n == 64
    with pytest.raises(ValueError, match="prefetch"):
        sbmm.plan(x, 4096, 4096, 4, 32, 128, False, 64, config=dict(narrow, prefetch=3), sp4=True)
    # pdl (griddepcontrol) compiles for sm_90+ only: anywhere else the plan says so instead of a compile error
    if not sbmm.pdl_ok(x.device):
        with pytest.raises(ValueError, match="capability 9.0"):
            sbmm.plan(x, 4096, 4096, 4, 32, 128, False, 64, config=dict(narrow, pdl=True), sp4=True)


@pytest.mark.parametrize("sp", ["sp4", "sp2"])
def test_sparse_mma_launches_take_their_own_tuned_tables(sp):
    """sp4 / sp2 launches read the "spmma" / "spmma2" tables (the s8 sweep), not the Gluon kernel's, and the
    worker's graph buckets (rows_bucket) cover their row bounds."""
    x = torch.zeros(8 * 16, 4096)
    table = "spmma2" if sp == "sp2" else "spmma"
    for n in (4096, 11008):
        for rows in (1, 4, 8, 16):
            launch = sbmm.plan(x[:8 * rows], n, 4096, 2 if sp == "sp2" else 4, 32, 128, False, 8,
                               **{sp: True})
            want = sbmm.pick_config(table, "cpu", rows, 2 if sp == "sp2" else 4, n, 8)
            assert launch.kernel == ("spmma2" if sp == "sp2" else "spmma") and launch.config == want
            assert launch.block_m == want["BLOCK_M"]
    bounds = {e["max_rows"] for e in sbmm._configs()["default"][table] if e["max_rows"] is not None}
    assert all(sbmm.rows_bucket(torch.device("cpu"), b) == b for b in bounds)
    if sp == "sp4":  # decode takes BLOCK_M 8; narrow outputs with two K steps in flight (the s10 sweeps)
        wide = sbmm.plan(x[:32], 11008, 4096, 4, 32, 128, False, 8, sp4=True)
        narrow = sbmm.plan(x[:32], 4096, 4096, 4, 32, 128, False, 8, sp4=True)
        assert wide.block_m == narrow.block_m == 8
        assert wide.config["prefetch"] is True and narrow.config["prefetch"] == 2
    # many programs take 128-row blocks (each warp reads x once for 4 row blocks; the s10 sweeps)
    many = torch.zeros(64 * 16, 4096)
    bits = 2 if sp == "sp2" else 4
    assert sbmm.plan(many, 11008, 4096, bits, 32, 128, False, 64, **{sp: True}).block_n == 128
    assert sbmm.plan(many[:8 * 16], 4096, 4096, bits, 32, 128, False, 8, **{sp: True}).block_n == 64


def test_decode_launches_read_x_as_given_where_the_tables_say():
    """x_dense (no sp4_x copy per call; bench/sbmm_options.py, session 13): sp4 at every BLOCK_M 8 entry (decode),
    sp2 only up to 512 programs (8 deltas at N 4096: it costs 2-bit launches with more programs); 16-row blocks
    never (4-byte x loads double their load instructions)."""
    x = torch.zeros(64 * 16, 4096)
    sp4 = {(n, num, rows): sbmm.plan(x[:num * rows], n, 4096, 4, 32, 128, False, num, sp4=True).config
           for n in (4096, 11008) for num in (1, 8, 64) for rows in (1, 4, 16)}
    assert all(c.get("x_dense", False) == (c["BLOCK_M"] == 8) for c in sp4.values())
    assert sp4[4096, 8, 1]["x_dense"] and not sp4[4096, 8, 16].get("x_dense", False)

    def sp2(n, num, rows):
        return sbmm.plan(x[:num * rows], n, 4096, 2, 32, 128, False, num, sp2=True).config

    assert sp2(4096, 8, 1).get("x_dense") and sp2(4096, 8, 4).get("x_dense") and sp2(4096, 1, 1).get("x_dense")
    assert not sp2(4096, 16, 1).get("x_dense", False) and not sp2(11008, 8, 1).get("x_dense", False)
    assert not sp2(4096, 8, 16).get("x_dense", False)
    # an x that cannot be read in place as pairs (odd storage offset) is copied: its launch names that variant,
    # so the warm-up compiles what such a call runs
    odd = torch.zeros(8 * 4096 + 1)[1:].view(8, 4096)
    launch = sbmm.plan(odd, 4096, 4096, 4, 32, 128, False, 8, sp4=True)
    assert launch.config["x_dense"] is False
    assert sbmm.compile_key(launch, 4096) != sbmm.compile_key(
        sbmm.plan(x[:8], 4096, 4096, 4, 32, 128, False, 8, sp4=True), 4096)


def test_pick_config_max_programs():
    """An entry with max_programs matches only launches with at most that many (n-block, tile) programs, and
    never when n or segments is unknown; the bound is not part of the launch config."""
    entry = {"max_rows": 8, "max_programs": 512, "BLOCK_M": 8, "BLOCK_N": 64, "tag": "small"}
    table = {"default": {"spmma": [entry, {"max_rows": None, "BLOCK_M": 16, "BLOCK_N": 64, "tag": "any"}]}}

    def pick(n, segments, rows=1):
        return sbmm.pick_config("spmma", "cpu", rows, 4, n, segments, table=table)["tag"]

    assert pick(4096, 8) == "small" and pick(4096, 8, 8) == "small"
    assert pick(4096, 9) == "any" and pick(8192, 8) == "any" and pick(None, 8) == "any" and pick(4096, None) == "any"
    assert "max_programs" not in sbmm.pick_config("spmma", "cpu", 1, 4, 4096, 8, table=table)


def test_sbmm_rejects_bad_shapes():
    stack, x, y, starts, slots = make_case(32, 64, 4, None, True, torch.float32, "one", "cpu")
    with pytest.raises(ValueError):
        sbmm.sbmm(x[:, :32], y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 4)
    with pytest.raises(ValueError):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 3)
    with pytest.raises(ValueError):
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, 4, kernel="cutlass")


# ------------------------------------------------------------------------------------------------ GPU

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): q/k/v/o, gate/up, down


@gpu
@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(SEGMENTS))
def test_kernels_match_reference_gpu_small(kernel, bits, group, dtype, layout):
    n, k = 256, 1024
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, layout, "cuda", pad_rows=3)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel=kernel)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(y_kernel[-3:], y[-3:])


WORD_ORDERS = [(2, False), (4, False), pytest.param(4, True, id="4-tiled")]  # (bits, tiled): tile-major is 4-bit


@gpu
@pytest.mark.parametrize("kernel", ["gluon", "triton"])
@pytest.mark.parametrize("bits,tiled", WORD_ORDERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_asym_gpu(kernel, bits, tiled, dtype):
    n, k = 192, 2048
    stack, x, y, starts, slots = make_case(n, k, bits, 128, False, dtype, "many", "cuda", seed=3)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel=kernel, tiled=tiled)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])


@gpu
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sbmm_llama_shapes_gpu(n, k, bits, group, dtype):
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, "odd", "cuda", seed=4)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k)  # default kernel and config
    tol = dict(TOL[dtype])
    tol["atol"] *= 3  # |y| grows with sqrt(K)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **tol)


@gpu
@pytest.mark.parametrize("block_m", [8, 16, 32, 64])
@pytest.mark.parametrize("block_n,num_warps", [(64, 4), (128, 4), (32, 2), (64, 2)])
@pytest.mark.parametrize("tiled", [False, pytest.param(True, id="tiled")])
def test_gluon_configs_gpu(block_m, block_n, num_warps, tiled):
    n, k, bits = 512, 2048, 4
    stack, x, y, starts, slots = make_case(n, k, bits, 128, True, torch.float16, "odd", "cuda", seed=5)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, prefetch=block_m != 32)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel="gluon", config=cfg, tiled=tiled)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[torch.float16])


@pytest.mark.parametrize("kernel", [pytest.param("triton", marks=interp), pytest.param("gluon", marks=gpu)])
def test_segments_hint_sizes_the_grid_for_padded_segment_lists(kernel):
    """A CUDA graph's segment tensors are padded (-1 slots, empty segments): a hint of the live segments
    (here 2 of 5) must still cover every tile, with and without a K split."""
    device = "cuda" if kernel == "gluon" else "cpu"
    dtype = torch.float16 if kernel == "gluon" else torch.float32
    n, k, bits = 128, 512, 4
    for min_ctas in (0, 10**6):
        stack, x, y, starts, slots = make_case(n, k, bits, 128, True, dtype, "empty", device, seed=11, pad_rows=5)
        cfg = (dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, prefetch=True, min_ctas=min_ctas) if kernel == "gluon" else
               dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1))
        y_kernel = y.clone()
        sbmm.sbmm(x, y_kernel, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                  kernel=kernel, config=cfg, segments_hint=2)
        y_ref = y.clone()
        reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                                 starts.cpu(), slots.cpu())
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])


# the device word layouts of kernels/layout.py: (bits, (kernel, config) launches checked on each case)
DEVICE_LAYOUTS = {
    "dense2": (2, [("gluon", None), ("gluon", dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, prefetch=False)),
                   ("gluon", dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, prefetch=True, min_ctas=10**6)),
                   ("gluon", dict(BLOCK_M=8, BLOCK_N=128, num_warps=4, prefetch=True))]),  # two block rows
    "tiled4": (4, [("gluon", None),
                   ("gluon", dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, prefetch=True, min_ctas=10**6)),
                   ("triton", None)]),
}


def device_words(stack: dict, word_layout: str) -> dict:
    """The stack as CUDA slots hold it: dense2 words (meta None) or tile-major 4-bit words and meta."""
    if word_layout == "tiled4":
        return tile_major(stack)
    words = torch.stack([layout.to_dense2(q, m) for q, m in zip(stack["qweight"], stack["meta"])])
    return {**stack, "qweight": words, "meta": None}


@gpu
@pytest.mark.parametrize("word_layout", list(DEVICE_LAYOUTS))
@pytest.mark.parametrize("n,k", [(320, 1408)] + LLAMA_SHAPES)
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(SEGMENTS))
def test_device_word_layouts_match_the_canonical_reference_gpu(word_layout, n, k, group, dtype, layout_name):
    """Deltas in the layouts CUDA slots hold (2-bit dense2 words re-encoded on the GPU, 4-bit words and meta
    tile-major) give the canonical reference's result: default config, unsplit and 8-way split launches, one and
    two block rows per program (test_gluon_configs_gpu covers half-block programs), and for tile-major 4-bit
    words the Triton kernel (on the small shape)."""
    if (n, k) != (320, 1408) and layout_name != "many":
        pytest.skip("Llama shapes: one segment layout is enough")
    bits, launches = DEVICE_LAYOUTS[word_layout]
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, layout_name, "cuda", seed=12)
    words = device_words(stack, word_layout)
    y_ref = y.clone()
    reference.sbmm_reference(x, y_ref, stack["qweight"], stack["meta"], stack["scales"], None, bits, (n, k),
                             starts.cpu(), slots.cpu())
    tol = dict(TOL[dtype])
    if k > 2048:
        tol["atol"] *= 3  # |y| grows with sqrt(K)
    for kernel, cfg in launches:
        if kernel == "triton" and (n, k) != (320, 1408):
            continue
        y_kernel = y.clone()
        sbmm.sbmm(x, y_kernel, words["qweight"], words["meta"], stack["scales"], None, starts, slots, bits,
                  kernel=kernel, config=cfg, tiled=word_layout == "tiled4")
        torch.testing.assert_close(y_kernel.float(), y_ref.float(), **tol, msg=lambda m: f"{kernel} {cfg}: {m}")


def test_dense2_needs_two_bit_symmetric_words():
    x, y = torch.zeros(2, 128), torch.zeros(2, 8)
    words, scales = torch.zeros(1, 8, 8, dtype=torch.int32), torch.zeros(1, 8, 1, dtype=torch.float16)
    seg = torch.tensor([0, 2]), torch.tensor([0])
    with pytest.raises(ValueError, match="dense2"):
        sbmm.sbmm(x, y, words, None, scales, None, *seg, 4)
    with pytest.raises(ValueError, match="dense2"):
        sbmm.sbmm(x, y, words, None, scales, None, *seg, 2)  # CPU: the Gluon kernel only


def test_split_k_choice():
    cfg = dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, min_ctas=2048)
    # 8 decode segments of a 4096x4096 delta: 64 n-blocks x 8 tiles = 512 programs -> 4 splits
    assert sbmm.split_k(cfg, 4096, 4096, 4, 32, 8) == 4
    assert sbmm.split_k(cfg, 4096, 4096, 4, 256, 64) == 1  # enough programs already
    assert sbmm.split_k({**cfg, "min_ctas": 0}, 4096, 4096, 4, 8, 1) == 1  # splitting off
    assert sbmm.split_k({**cfg, "min_ctas": 10**6}, 4096, 4096, 4, 1, 1) == sbmm.MAX_SPLIT_K
    # never more splits than K tiles (2-bit K tile = 256 columns: 2 tiles), and no empty split
    assert sbmm.split_k({**cfg, "min_ctas": 10**6}, 4096, 512, 2, 1, 1) == 2
    for steps in range(1, 40):
        s = sbmm.split_k({**cfg, "min_ctas": 10**6}, 64, 128 * steps, 4, 1, 1)
        assert (s - 1) * -(-steps // s) < steps, (steps, s)


@gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(SEGMENTS))
@pytest.mark.parametrize("min_ctas", [10**6, 100])
def test_gluon_split_k_gpu(bits, group, dtype, layout, min_ctas):
    """Split-K (fp32 partials, last program per tile reduces) equals the reference, also with uneven splits
    (K = 11 tiles) and segments that leave rows untouched; repeated calls give bit-identical results."""
    n, k = 320, 11 * 8 * 64 // bits
    stack, x, y, starts, slots = make_case(n, k, bits, group, True, dtype, layout, "cuda", seed=9)
    cfg = dict(BLOCK_M=8, BLOCK_N=64, num_warps=2, prefetch=True, min_ctas=min_ctas)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel="gluon", config=cfg)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])
    again, _ = run_both(stack, x, y, starts, slots, bits, n, k, kernel="gluon", config=cfg)
    assert torch.equal(again, y_kernel)


@gpu
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
def test_triton_kernel_with_ptx_expander_gpu(bits, dtype, sym):
    n, k = 192, 1056  # K not a multiple of the Gluon K tile: the shape the Triton fallback exists for
    stack, x, y, starts, slots = make_case(n, k, bits, None, sym, dtype, "odd", "cuda", seed=6)
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, use_asm=True)
    y_kernel, y_ref = run_both(stack, x, y, starts, slots, bits, n, k, kernel="triton", config=cfg)
    torch.testing.assert_close(y_kernel.float(), y_ref.float(), **TOL[dtype])


@pytest.mark.parametrize("n,k", [(64, 128), (128, 512), (192, 256)])
def test_sp4_layout_round_trip(n, k):
    """pack_sp4 is a permutation of the canonical codes and meta halves (same shapes, nothing duplicated) that
    unpack_sp4 undoes exactly, also for slot-stacked tensors."""
    g = torch.Generator().manual_seed(n + k)
    stacked = stack_packed([random_packed(n, k, 4, 128, generator=g) for _ in range(2)])
    q, m = spmma_layout.pack_sp4(stacked["qweight"], stacked["meta"])
    assert q.shape == stacked["qweight"].shape and m.shape == stacked["meta"].shape
    back = spmma_layout.unpack_sp4(q, m)
    assert torch.equal(back[0], stacked["qweight"]) and torch.equal(back[1], stacked["meta"])
    w = q.shape[-1]
    codes, canon_codes = (packing.unpack_codes(t.reshape(-1, w), 4, 8 * w) for t in (q, stacked["qweight"]))
    assert torch.equal(codes.flatten().sort().values, canon_codes.flatten().sort().values)
    halves, canon_halves = (t.view(torch.int16).flatten().sort().values for t in (m, stacked["meta"]))
    assert torch.equal(halves, canon_halves)


def test_sp4_places_the_documented_codes():
    """Lane 4g + t, word j of 16-row block rb holds the kept codes of groups 8j + t (+4) of rows g (+8) as
    pairs at bits 4p / 4p + 16; its meta slot holds the canonical meta bits of rows g / g + 8."""
    n, k = 128, 256
    p = random_packed(n, k, 4, None, generator=torch.Generator().manual_seed(3))
    q, m = spmma_layout.pack_sp4(p["qweight"], p["meta"])
    codes = packing.unpack_codes(p["qweight"], 4, k // 2)  # [N, K/2]
    halves = p["meta"].view(torch.int16).to(torch.int64) & 0xFFFF  # [N, K/16]
    qb = q.reshape(n // 64, k // 128, 4, 32, 4).to(torch.int64) & 0xFFFFFFFF
    mb = m.reshape(n // 64, k // 128, 4, 32, 2).to(torch.int64) & 0xFFFFFFFF
    for b, s, rb, g, t, j in [(0, 0, 0, 0, 0, 0), (1, 1, 3, 7, 3, 3), (0, 1, 2, 5, 1, 2), (1, 0, 1, 3, 2, 1)]:
        word = int(qb[b, s, rb, 4 * g + t, j])
        for h in range(2):
            for hi in range(2):
                row, group = 64 * b + 16 * rb + 8 * h + g, 32 * s + 8 * j + t + 4 * hi
                pp = h + 2 * hi
                assert (word >> 4 * pp) & 0xF == codes[row, 2 * group]
                assert (word >> (4 * pp + 16)) & 0xF == codes[row, 2 * group + 1]
        sel, c = t // 2, t % 2
        for slot in range(2):
            jj = sel + 2 * slot
            row = 64 * b + 16 * rb + g
            want = int(halves[row, 8 * s + 2 * jj + c]) | int(halves[row + 8, 8 * s + 2 * jj + c]) << 16
            assert int(mb[b, s, rb, 4 * g + t, slot]) == want


def test_tuned_for_names_the_devices_with_tables_of_their_own(monkeypatch):
    """The worker warns at start when its GPU has no tables (services/worker/bootstrap.py `_warn_if_untuned`)."""
    assert not sbmm_plan.tuned_for(torch.device("cpu"))
    for name, tuned in (("NVIDIA H100 80GB HBM3", True), ("NVIDIA H200", True), ("NVIDIA B200", False)):
        monkeypatch.setattr(sbmm_plan, "_device_name", lambda device, name=name: name)
        assert sbmm_plan.tuned_for(torch.device("cuda", 0)) is tuned, name
