"""apply_deltas / PackedDeltaStack / DenseDeltaStack: the worker's entry point, on CPU (and GPU if present)."""

import pytest
import torch

from kernels import layout, packing, spmma_layout
from kernels.delta_linear import (DenseDeltaStack, PackedDeltaStack, apply_deltas, canonical_words,
                                  validate_segments)
from tests.kernels.packed_factory import random_packed

CUDA = torch.cuda.is_available()


def dense_of(p, bits, shape):
    return packing.dequantize(p["qweight"], p["scales"], p["zeros"], p["meta"], bits, shape)


def expected(x, y, deltas, starts, slots, dtype):
    """y[seg] += x[seg] @ W.T with W rounded to the activation dtype, computed slot by slot in fp32."""
    out = y.float().clone()
    for s, slot in enumerate(slots):
        a, b = starts[s], starts[s + 1]
        if slot >= 0:
            out[a:b] += x[a:b].float() @ deltas[slot].to(dtype).float().T
    return out


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_packed_stack_apply_matches_per_slot_dense(bits, sym):
    n, k = 24, 128
    g = torch.Generator().manual_seed(0)
    packed = [random_packed(n, k, bits, 32, sym, generator=g) for _ in range(3)]
    stack = PackedDeltaStack.from_packed(packed, bits=bits, shape=(n, k))
    assert stack.num_slots == 3 and stack.group_size == 32 and stack.sym == sym
    x, y = torch.randn(7, k, generator=g), torch.randn(7, n, generator=g)
    starts, slots = [0, 2, 2, 5, 6], [2, 0, -1, 1]
    want = expected(x, y, [dense_of(p, bits, (n, k)) for p in packed], starts, slots, torch.float32)
    apply_deltas(x, y, stack, torch.tensor(starts), torch.tensor(slots))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[6], want[6])  # row 6 is past every segment


def assert_applies_like_canonical(stack, packed, g):
    """apply_deltas on a re-ordered stack of `packed` (slots 0, 1) = the dense deltas' products, over three
    segments (slot 1, no delta, slot 0)."""
    n, k = stack.shape
    x, y = torch.randn(5, k, generator=g), torch.randn(5, n, generator=g)
    starts, slots = [0, 2, 3, 5], [1, -1, 0]
    want = expected(x, y, [dense_of(p, stack.bits, (n, k)) for p in packed], starts, slots, torch.float32)
    apply_deltas(x, y, stack, torch.tensor(starts), torch.tensor(slots))
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_tiled_stack_stores_tile_major_and_applies_like_the_canonical_one(sym):
    """A tiled stack (4-bit words and meta tile-major, as CUDA slots hold them) writes that order in set_slot, and
    its CPU path reads it back: the same products as the canonical stack of the same deltas."""
    n, k = 128, 256
    g = torch.Generator().manual_seed(5)
    packed = [random_packed(n, k, 4, 64, sym, generator=g) for _ in range(2)]
    stack = PackedDeltaStack.from_packed(packed, bits=4, shape=(n, k), tiled=True)
    assert stack.tiled and torch.equal(stack.qweight[1], layout.tile_packed(packed[1]["qweight"], packed[1]["meta"])[0])
    assert torch.equal(stack.meta[1], layout.tile_packed(packed[1]["qweight"], packed[1]["meta"])[1])
    assert_applies_like_canonical(stack, packed, g)


def test_tiled_stacks_need_four_bit_words_of_whole_tiles():
    with pytest.raises(ValueError, match="tiled"):
        PackedDeltaStack.empty(1, (128, 256), 2, tiled=True)
    with pytest.raises(ValueError, match="tiled"):
        PackedDeltaStack.empty(1, (96, 256), 4, tiled=True)
    with pytest.raises(ValueError, match="tiled"):
        PackedDeltaStack.empty(1, (128, 160), 4, group_size=32, tiled=True)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group", [128, None])
def test_sparse_mma_stack_stores_its_order_and_reads_back_canonical(bits, group):
    """An sp4 (4-bit) or sp2 (2-bit) stack (symmetric words and meta in a sparse-MMA kernel's order, as CUDA slots
    hold them) writes spmma_layout.pack_sp4's / pack_sp2's bytes in set_slot, reads back the canonical words, and
    its CPU path gives the canonical stack's products; empty slots hold valid mma.sp meta."""
    n, k = 128, 256 if bits == 4 else 512
    g = torch.Generator().manual_seed(6 if bits == 4 else 8)
    packed = [random_packed(n, k, bits, group, True, generator=g) for _ in range(2)]
    order = {"sp4": bits == 4, "sp2": bits == 2}
    stack = PackedDeltaStack.from_packed(packed, bits=bits, shape=(n, k), **order)
    pack = spmma_layout.pack_sp4 if bits == 4 else spmma_layout.pack_sp2
    want_q, want_m = pack(packed[1]["qweight"], packed[1]["meta"])
    assert (stack.sp4, stack.sp2) == (order["sp4"], order["sp2"])
    assert torch.equal(stack.qweight[1], want_q) and torch.equal(stack.meta[1], want_m)
    q, m = canonical_words(stack.qweight, stack.meta, stack.tiled, stack.sp4, stack.sp2)
    assert torch.equal(q[0], packed[0]["qweight"]) and torch.equal(m[0], packed[0]["meta"])
    assert torch.all(PackedDeltaStack.empty(1, (n, k), bits, **order).meta == 0x44444444)
    assert_applies_like_canonical(stack, packed, g)


def test_sp4_stacks_need_what_the_sparse_mma_kernel_takes():
    for args, kwargs in [((1, (128, 256), 2), {}), ((1, (96, 256), 4), {}), ((1, (128, 256), 4), {"sym": False}),
                         ((1, (128, 256), 4), {"group_size": 64}), ((1, (128, 256), 4), {"tiled": True})]:
        with pytest.raises(ValueError, match="sp4"):
            PackedDeltaStack.empty(*args, sp4=True, **kwargs)


def test_sp2_stacks_need_what_the_sparse_mma_kernel_takes():
    for args, kwargs in [((1, (128, 512), 4), {}), ((1, (96, 512), 2), {}), ((1, (128, 384), 2), {}),
                         ((1, (128, 512), 2), {"sym": False}), ((1, (128, 512), 2), {"group_size": 64}),
                         ((1, (128, 512), 4), {"sp4": True})]:
        with pytest.raises(ValueError, match="sp2"):
            PackedDeltaStack.empty(*args, sp2=True, **kwargs)


def test_set_slot_replaces_one_delta_in_place():
    n, k, bits = 16, 64, 4
    g = torch.Generator().manual_seed(1)
    stack = PackedDeltaStack.empty(2, (n, k), bits, group_size=None)
    qweight_storage = stack.qweight.data_ptr()
    p = random_packed(n, k, bits, None, generator=g)
    stack.set_slot(1, p)
    assert stack.qweight.data_ptr() == qweight_storage
    x = torch.randn(3, k, generator=g)
    y = torch.zeros(3, n)
    apply_deltas(x, y, stack, torch.tensor([0, 1, 3]), torch.tensor([0, 1]))
    torch.testing.assert_close(y[0], torch.zeros(n))  # slot 0 is still the empty (zero) delta
    torch.testing.assert_close(y[1:], x[1:] @ dense_of(p, bits, (n, k)).T, atol=1e-4, rtol=1e-4)
    stack.clear_slot(1)
    y2 = torch.zeros(3, n)
    apply_deltas(x, y2, stack, torch.tensor([0, 1, 3]), torch.tensor([0, 1]))
    assert not y2.any()


def test_from_packed_accepts_delta_tensor_like_objects():
    class Part:  # what deltazip.artifact.DeltaTensor exposes
        def __init__(self, p, bits, shape):
            self.qweight, self.meta, self.scales, self.zeros = p["qweight"], p["meta"], p["scales"], p["zeros"]
            self.bits, self.shape = bits, shape

    p = random_packed(8, 64, 2, None, generator=torch.Generator().manual_seed(2))
    stack = PackedDeltaStack.from_packed([Part(p, 2, (8, 64))])
    assert stack.bits == 2 and stack.shape == (8, 64) and stack.group_size == 64


def test_invalid_segments_and_shapes_raise_value_error():
    stack = PackedDeltaStack.empty(2, (16, 64), 4, group_size=32)
    x, y = torch.randn(4, 64), torch.zeros(4, 16)
    with pytest.raises(ValueError, match="out of range"):
        apply_deltas(x, y, stack, torch.tensor([0, 4]), torch.tensor([2]))
    with pytest.raises(ValueError, match="out of range"):
        apply_deltas(x, y, stack, torch.tensor([0, 4]), torch.tensor([-2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        apply_deltas(x, y, stack, torch.tensor([0, 3, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        apply_deltas(x, y, stack, torch.tensor([0, 5]), torch.tensor([0]))
    with pytest.raises(ValueError):
        apply_deltas(x[:, :32], y, stack, torch.tensor([0, 4]), torch.tensor([0]))
    with pytest.raises(ValueError):
        stack.set_slot(0, random_packed(16, 128, 4, 32))
    with pytest.raises(ValueError):
        PackedDeltaStack.empty(1, (16, 64), 3)
    validate_segments(torch.tensor([0, 0, 4]), torch.tensor([1, -1]), 4, 2)  # empty segment is fine


def test_dense_stack_loop_and_bmm_paths_cpu():
    n, k = 12, 32
    g = torch.Generator().manual_seed(3)
    deltas = torch.randn(3, n, k, generator=g) * 0.01
    stack = DenseDeltaStack.empty(3, (n, k), torch.float32)
    for i in range(3):
        stack.set_slot(i, deltas[i])
    x, y = torch.randn(6, k, generator=g), torch.randn(6, n, generator=g)
    starts, slots = [0, 2, 4, 6], [1, -1, 2]
    want = expected(x, y, deltas, starts, slots, torch.float32)
    apply_deltas(x, y, stack, torch.tensor(starts), torch.tensor(slots))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_deltas_gpu_packed_and_dense(dtype):
    n, k, bits = 4096, 4096, 4
    g = torch.Generator().manual_seed(4)
    packed = [random_packed(n, k, bits, 128, generator=g) for _ in range(4)]
    stack = PackedDeltaStack.from_packed(packed, bits=bits, shape=(n, k), device="cuda")
    dense = torch.stack([dense_of(p, bits, (n, k)) for p in packed]).to(dtype)
    x = torch.randn(16, k, generator=g).to(dtype)
    y0 = torch.randn(16, n, generator=g).to(dtype)
    starts, slots = [0, 4, 8, 12, 16], [3, 0, 2, 1]
    want = expected(x, y0, dense, starts, slots, dtype)
    for st in (stack, DenseDeltaStack(dense.cuda())):
        y = y0.cuda().clone()
        apply_deltas(x.cuda(), y, st, torch.tensor(starts), torch.tensor(slots))  # equal lengths: bmm path
        torch.testing.assert_close(y.float().cpu(), want, atol=0.15, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, None])
def test_apply_deltas_gpu_sp4_stack_equals_the_canonical_one(dtype, group):
    """An sp4 stack on the GPU (the sparse-MMA kernel) gives the reference products, and what the canonical stack of
    the same deltas gives; a -1 segment and an empty slot add nothing."""
    n, k = 1024, 2048
    g = torch.Generator().manual_seed(7)
    packed = [random_packed(n, k, 4, group, generator=g) for _ in range(3)]
    sp4 = PackedDeltaStack.from_packed(packed, bits=4, shape=(n, k), device="cuda", sp4=True)
    sp4.clear_slot(2)
    rows = PackedDeltaStack.from_packed(packed, bits=4, shape=(n, k), device="cuda")
    rows.clear_slot(2)
    dense = [dense_of(p, 4, (n, k)) for p in packed[:2]] + [torch.zeros(n, k)]
    x = torch.randn(13, k, generator=g).to(dtype)
    y0 = torch.randn(13, n, generator=g).to(dtype)
    starts, slots = [0, 1, 6, 8, 13], [0, 1, -1, 2]
    want = expected(x, y0, dense, starts, slots, dtype)
    got = {}
    for name, st in (("sp4", sp4), ("rows", rows)):
        y = y0.cuda().clone()
        apply_deltas(x.cuda(), y, st, torch.tensor(starts), torch.tensor(slots))
        got[name] = y.float().cpu()
    torch.testing.assert_close(got["sp4"], want, atol=0.1, rtol=2e-2)
    torch.testing.assert_close(got["sp4"], got["rows"], atol=0.1, rtol=2e-2)
    assert torch.equal(got["sp4"][6:], y0[6:].float())


def test_sp2_prefill_plan_picks_the_block_size_and_counts_programs():
    """The router's plan of an sp2_wgmma launch: 128-row blocks, or 64 where half-empty last blocks of 128 cost
    more; programs N / 128 (N / 64 where 128 does not divide it) per block."""
    from kernels.delta_linear import sp2_prefill_plan

    assert sp2_prefill_plan(4096, [128]) == (128, 32)  # o / down, one delta of 128 rows: too few, SBMM runs it
    assert sp2_prefill_plan(4096, [128, 129, 512]) == (128, 32 * (1 + 2 + 4))
    assert sp2_prefill_plan(4096, [130]) == (64, 32 * 3)  # three 64-row blocks cost less than two of 128
    assert sp2_prefill_plan(4096, [130], block64_cost=0.7) == (128, 32 * 2)
    assert sp2_prefill_plan(12288, [128]) == (128, 96)
    assert sp2_prefill_plan(64 * 3, [1]) == (64, 3)


def test_left_rows_routes_all_of_a_steps_prompt_work_or_none():
    """SP2_PREFILL_LEFT_ROWS (the router's left_rows): with it, the prefill kernel runs only when SBMM is left no
    segment of that many rows; decoding rows (fewer), segments without a delta and those of the dense route's size
    do not hold it back. Host logic only (N 4032: no K split to plan, tables on the CPU)."""
    from kernels.delta_linear import _sp2_route

    def route(starts, slots, left_rows):
        return _sp2_route(tuple(starts), tuple(slots), 4032, 2048, 96, 1024, 1, 0.62, torch.device("cpu"),
                          left_rows)

    one_prompt = [0, 120, 121, 122, 130]  # one fine-tune's 120 rows, two decoding rows, 8 more
    assert route(one_prompt, [0, 1, 2, 3], None)[2] == [0, -1, -1, -1]
    assert route(one_prompt, [0, 1, 2, 3], 32)[2] == [0, -1, -1, -1]
    four_prompts = [0, 120, 190, 310, 350]  # 120 and 120 route; 70 (too short) and 40 (too short) stay on SBMM
    assert route(four_prompts, [0, 1, 2, 3], None)[2] == [0, -1, 2, -1]
    assert route(four_prompts, [0, 1, 2, 3], 32) is None
    assert route(four_prompts, [0, 1, 2, 3], 71)[2] == [0, -1, 2, -1]  # 70 and 40 are below 71
    assert route(four_prompts, [0, -1, 2, -1], 32)[2] == [0, -1, 2, -1]  # what has no delta stays out of the count
    assert route([0, 120, 1320], [0, 1], 32)[2] == [0, -1]  # 1200 rows go to the dense route, not SBMM


def test_a_segment_routes_only_where_it_fills_its_blocks():
    """SP2_BLOCK_FILL: 100 rows (one block, 78%) and 200 (two, 78%) fill their 128-row blocks well enough, 150 (59%)
    and 60 do not."""
    from kernels.delta_linear import fills_blocks

    assert fills_blocks(100, 0.68) and fills_blocks(200, 0.68) and fills_blocks(512, 0.68)
    assert not fills_blocks(150, 0.68) and not fills_blocks(60, 0.68) and not fills_blocks(260, 0.68)
    assert fills_blocks(150, 0.5)


HOPPER = CUDA and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("n,k,launch", [(4096, 4096, "ws"), (1024, 2048, None), (4096 - 64, 2048, "pipelined")])
def test_apply_deltas_gpu_routes_long_sp2_segments_to_the_prefill_kernels(monkeypatch, n, k, launch):
    """With host segments, an sp2 stack's segments of SP2_PREFILL_ROWS+ rows run on the prefill kernels when the
    launch has enough programs: kernels/sp2_wgmma_ws.py in 128-row blocks (4096 x 4096, two long segments),
    kernels/sp2_wgmma.py where N is no multiple of 128 (4032 x 2048: 64-row blocks); SBMM otherwise (1024 x 2048:
    72 programs, K too short to split); the sum is the reference either way."""
    from kernels import delta_linear, sp2_wgmma, sp2_wgmma_ws

    monkeypatch.setattr(delta_linear, "SP2_PREFILL_ROWS", 128)
    g = torch.Generator().manual_seed(11)
    packed = [random_packed(n, k, 2, 128, generator=g) for _ in range(3)]
    stack = PackedDeltaStack.from_packed(packed, bits=2, shape=(n, k), device="cuda", sp2=True)
    dense = [dense_of(p, 2, (n, k)) for p in packed]
    starts, slots = [0, 300, 305, 1000, 1010], [2, 0, 1, -1]
    x = torch.randn(starts[-1], k, generator=g).half()
    y0 = torch.randn(starts[-1], n, generator=g).half()
    calls = []
    for name, module, fn in (("pipelined", sp2_wgmma, "sp2_wgmma"), ("ws", sp2_wgmma_ws, "sp2_wgmma_ws")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _name=name, **kw: calls.append((_name, a[6]))
                            or _real(*a, **kw))
    y = y0.cuda()
    apply_deltas(x.cuda(), y, stack, torch.tensor(starts), torch.tensor(slots), host_segments=(starts, slots))
    want = expected(x, y0, dense, starts, slots, torch.float16)
    torch.testing.assert_close(y.float().cpu(), want, atol=0.1, rtol=2e-2)
    assert calls == ([] if launch is None else [(launch, [2, -1, 1, -1])])
