"""Worker on CUDA: decode CUDA graphs equal eager, and every serving mode gives the same greedy tokens on the
real SmolLM2 fine-tunes in demo/deltas. Skips without CUDA.

Run: TRITON_INTERPRET= PYTHONPATH=. python -m pytest -q tests/gpu/test_worker_gpu.py
"""

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]
DEMO_DELTAS = ROOT / "demo" / "deltas"
PROMPTS = ["What is 17 + 25?", "Write a Python function that reverses a string.", "Hello! Who are you?"]


def _engine(model, cuda_graphs: bool, **overrides):
    from services.worker.engine.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(**{"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 32, "cuda_graphs": cuda_graphs,
                          **overrides})
    return LLMEngine(model, cfg, eos_token_ids=[])


@pytest.mark.parametrize("dtype", [torch.float32])  # fp16: padded-context reductions may flip a near-tie argmax
def test_decode_graph_equals_eager_tiny_model(dtype):
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.sampling import SamplingParams
    from deltazip.model.synthetic import random_state_dict, tiny_config

    cfg = tiny_config(vocab_size=256, max_position_embeddings=512)
    state = {k: v.to("cuda", dtype) for k, v in random_state_dict(cfg, seed=0).items()}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (19,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        engine = _engine(model_from_state_dict(cfg, {k: v.clone() for k, v in state.items()}), graphs)
        for i, p in enumerate(prompts):  # 19 sequences: padded to 32, and to smaller sizes as they finish
            engine.add_request(f"r{i}", p, params)
        outs.append({k: v[0] for k, v in engine.run_until_done().items()})
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "no graph was captured"
    assert outs[0] == outs[1]


def test_decode_graph_hidden_states_match_eager():
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from services.worker.engine.sequence import Sequence
    from deltazip.model.sampling import SamplingParams

    cfg = tiny_config(vocab_size=256, max_position_embeddings=256)
    model = model_from_state_dict(cfg, {k: v.cuda() for k, v in random_state_dict(cfg, seed=2).items()})
    engine = _engine(model, True, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", list(range(3, 10 + 7 * i)), params)
    engine.step()  # prefill (eager)
    items = [(s, 1) for s in engine.scheduler.running]
    for s, _ in items:
        engine.blocks.allocate(s, 1)
    step = engine.runner.prepare(items)
    from deltazip.model.context import ForwardContext

    with torch.inference_mode():
        eager = model(step.input_ids, ForwardContext(attn=step.attn)).clone()
        graph = engine.runner.graphs.run(step.input_ids, step.attn).clone()
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    from deltazip.convert.base import default_base_dir

    if not (DEMO_DELTAS / "smollm2-arith" / "manifest.json").is_file():
        pytest.skip("demo/deltas not present")
    return Path(default_base_dir()), DEMO_DELTAS


def models_of(base_dir: Path) -> list[str]:
    return [base_dir.resolve().name, "smollm2-arith", "smollm2-python"]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2, tmp_path_factory):
    from tests.unit.worker.test_worker_modes import serve_all

    base_dir, cache = smollm2
    return serve_all(base_dir, cache, tmp_path_factory.mktemp("ref"), "delta", models=models_of(base_dir), prompts=PROMPTS,
                     max_tokens=24, device="cuda", dtype="float32", num_kv_blocks=512, kv_block_size=16,
                     cuda_graphs=0)


@pytest.mark.parametrize("mode, graphs", [("delta", 1), ("dense-delta", 0), ("swap", 0), ("swap", 1)])
def test_modes_same_greedy_tokens_on_smollm2(smollm2, smollm2_reference, tmp_path, mode, graphs):
    from tests.unit.worker.test_worker_modes import serve_all

    base_dir, cache = smollm2
    names = models_of(base_dir)
    got = serve_all(base_dir, cache, tmp_path, mode, models=names, prompts=PROMPTS, max_tokens=24, device="cuda",
                    dtype="float32", num_kv_blocks=512, kv_block_size=16, cuda_graphs=graphs)
    assert got == smollm2_reference
    assert smollm2_reference[(names[1], PROMPTS[0])] != smollm2_reference[(names[0], PROMPTS[0])]


# model shapes: tiny (no linear tiles: 4-bit stacks in row order), one whose linears but down_proj tile (tiled4:
# scale groups of 32 columns), and one whose linears all tile with groups of 128 (sp4, the sparse-MMA kernel)
GRAPH_MODELS = {"rows": {}, "tiled": {"hidden_size": 256, "intermediate_size": 320, "head_dim": 64},
                "sp4": {"hidden_size": 256, "intermediate_size": 384, "head_dim": 64}}
GRAPH_GROUPS = {"rows": 32, "tiled": 32, "sp4": 128}  # scale group of the synthetic deltas
GRAPH_ORDERS = {"rows": set(), "tiled": {"tiled4"}, "sp4": {"sp4"}}  # the re-ordered 4-bit layouts expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", list(GRAPH_MODELS))
def test_decode_graph_with_packed_deltas_matches_eager(dtype, shape):
    """Decode steps whose rows use packed deltas replay a captured graph (SBMM inside) == eager StepDeltaOps, with
    4-bit stacks in row order, tile-major and in the sparse-MMA order (sp4)."""
    from deltazip.model.context import ForwardContext
    from deltazip.model.layers import NamedLinear
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.sampling import SamplingParams
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from services.worker.engine.engine import EngineConfig, LLMEngine
    from tests.unit.worker.test_graph_deltas import make_delta

    cfg = tiny_config(vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True, **GRAPH_MODELS[shape])
    model = model_from_state_dict(cfg, {k: v.to("cuda", dtype) for k, v in random_state_dict(cfg, seed=2).items()})
    names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(4, "cuda", dtype, names, tie_word_embeddings=True)
    slots.write(0, "a", make_delta(model, 4, 1, with_dense=True, group=GRAPH_GROUPS[shape]))
    slots.write(1, "b", make_delta(model, 2, 2, with_dense=False, group=GRAPH_GROUPS[shape]))
    orders = {s.layout for stacks in slots.stacks_by_name().values() for s in stacks} & {"tiled4", "sp4"}
    assert orders == GRAPH_ORDERS[shape]

    def provider(segments):
        if all(name is None for name, _ in segments):
            return None
        return StepDeltaOps(slots, [(None if n is None else int(n), rows) for n, rows in segments])

    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, block_size=16, max_num_seqs=8, cuda_graphs=True,
                                           max_deltas_per_batch=2), eos_token_ids=[], deltas_provider=provider)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", list(range(3, 10 + 7 * i)), params, delta=[None, "0", "1"][i % 3])
    engine.step()  # prefill (eager)
    items = [(s, 1) for s in engine.scheduler.running]
    for s, _ in items:
        engine.blocks.allocate(s, 1)
    step = engine.runner.prepare(items)
    ops = engine.runner._deltas(step.token_segments)
    assert engine.runner.graphs.takes_deltas(ops)
    with torch.inference_mode():
        eager = model(step.input_ids, ForwardContext(attn=step.attn, deltas=ops)).clone()
        base = model(step.input_ids, ForwardContext(attn=step.attn)).clone()
        graph = engine.runner.graphs.run(step.input_ids, step.attn, ops).clone()
        again = engine.runner.graphs.run(step.input_ids, step.attn, ops).clone()  # a replay, not the capture
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(graph, eager, rtol=tol, atol=tol)
    torch.testing.assert_close(again, eager, rtol=tol, atol=tol)
    assert not torch.allclose(eager, base, rtol=tol, atol=tol)  # the deltas change the rows that use them
    assert any(k[2] for k in engine.runner.graphs.graphs), "no delta graph was captured"


@pytest.mark.parametrize("n,k,want_layout", [(256, 1024, "tiled4"), (96, 1024, "canonical"), (256, 1056, "canonical")])
def test_four_bit_deltas_load_tiled_where_they_tile_and_match_the_canonical_reference(n, k, want_layout):
    """DeviceSlots on CUDA stores a 4-bit 2:4 delta whose N and K tile as tile-major words and meta (the bytes of
    layout.tile_packed); other shapes keep the row order. Either way the step's kernel launch equals the canonical
    dequantize-then-matmul, and an empty slot adds nothing."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import layout, packing
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from tests.kernels.packed_factory import random_packed

    p = random_packed(n, k, 4, 32, True, generator=torch.Generator().manual_seed(3))
    delta = DeltaTensor("w.weight", "sparse24", (n, k), 4, 32, True, **{f: p[f] for f in ("qweight", "meta", "scales")})
    slots = DeviceSlots(2, "cuda", torch.float16, {"w.weight"}, tie_word_embeddings=False)
    slots.write(1, "d", {"w.weight": delta})
    stack = slots.stack(1, "w.weight")
    assert stack.layout == want_layout
    stored = layout.tile_packed(p["qweight"], p["meta"]) if want_layout == "tiled4" else (p["qweight"], p["meta"])
    assert torch.equal(stack.parts["qweight"][1].cpu(), stored[0]) and torch.equal(stack.parts["meta"][1].cpu(), stored[1])
    x = torch.randn(7, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(7, n, device="cuda", dtype=torch.float16)
    StepDeltaOps(slots, [(1, 4), (0, 3)]).linear("w", x, y)
    w = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 4, (n, k)).to("cuda", torch.float16)
    torch.testing.assert_close(y[:4].float(), x[:4].float() @ w.float().T, atol=3e-2, rtol=1e-2)
    assert torch.equal(y[4:], torch.zeros_like(y[4:]))


@pytest.mark.parametrize("group,sym,sp4,want_layout", [(128, True, None, "sp4"), (None, True, None, "sp4"),
                                                      (128, False, None, "tiled4"), (128, True, False, "tiled4")])
def test_four_bit_symmetric_deltas_load_as_sp4_and_match_the_canonical_reference(group, sym, sp4, want_layout):
    """DeviceSlots on CUDA stores a 4-bit symmetric 2:4 delta with scales per row or per 128 columns in the
    sparse-MMA order (the bytes of spmma_layout.pack_sp4) unless sp4=False; an asymmetric one goes tile-major. The step's
    kernel launch equals the canonical dequantize-then-matmul either way, and an empty slot adds nothing."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import layout, packing, spmma_layout
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from tests.kernels.packed_factory import random_packed

    n, k = 512, 1024
    p = random_packed(n, k, 4, group, sym, generator=torch.Generator().manual_seed(5))
    delta = DeltaTensor("w.weight", "sparse24", (n, k), 4, group, sym,
                        **{f: p[f] for f in ("qweight", "meta", "scales", "zeros")})
    slots = DeviceSlots(3, "cuda", torch.float16, {"w.weight"}, tie_word_embeddings=False, sp4=sp4)
    slots.write(1, "d", {"w.weight": delta})
    stack = slots.stack(1, "w.weight")
    assert stack.layout == want_layout
    order = spmma_layout.pack_sp4 if want_layout == "sp4" else layout.tile_packed
    stored = order(p["qweight"], p["meta"])
    assert torch.equal(stack.parts["qweight"][1].cpu(), stored[0]) and torch.equal(stack.parts["meta"][1].cpu(), stored[1])
    x = torch.randn(9, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(9, n, device="cuda", dtype=torch.float16)
    StepDeltaOps(slots, [(1, 5), (0, 2), (2, 2)]).linear("w", x, y)
    w = packing.dequantize(p["qweight"], p["scales"], p["zeros"], p["meta"], 4, (n, k)).to("cuda", torch.float16)
    torch.testing.assert_close(y[:5].float(), x[:5].float() @ w.float().T, atol=3e-2, rtol=1e-2)
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))


@pytest.mark.parametrize("bits", [4, 2])
def test_long_segments_take_the_dense_route_and_match_the_canonical_reference(bits, monkeypatch):
    """A step whose segments reach sbmm.dense_rows (a long prompt on a delta) runs them as the delta expanded once
    + cuBLAS (kernels/delta_linear.py) and the short ones on SBMM, in one StepDeltaOps.linear; both equal the
    canonical dequantize-then-matmul, and base rows stay untouched."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import delta_linear, packing, sbmm
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from tests.kernels.packed_factory import random_packed

    n, k = 512, 1024
    deltas, weights = {}, {}
    for slot in (0, 1):
        p = random_packed(n, k, bits, 128, True, generator=torch.Generator().manual_seed(slot + 10 * bits))
        deltas[slot] = DeltaTensor("w.weight", "sparse24", (n, k), bits, 128, True,
                                   **{f: p[f] for f in ("qweight", "meta", "scales", "zeros")})
        weights[slot] = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], bits, (n, k)).to("cuda",
                                                                                                    torch.float16)
    slots = DeviceSlots(2, "cuda", torch.float16, {"w.weight"}, tie_word_embeddings=False, sp2=bits == 2)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {"w.weight": delta})
    assert slots.stack(0, "w.weight").layout == ("sp4" if bits == 4 else "sp2")
    routed = []
    dense_linear = delta_linear.dense_linear
    monkeypatch.setattr(delta_linear, "dense_linear",
                        lambda x, y, stack, slot: routed.append((x.shape[0], slot)) or dense_linear(x, y, stack, slot))
    monkeypatch.setattr(sbmm, "dense_rows", lambda device, b: 300)
    segments = [(0, 700), (None, 5), (1, 40), (1, 300)]
    t = sum(rows for _, rows in segments)
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(t, n, device="cuda", dtype=torch.float16)
    StepDeltaOps(slots, segments).linear("w", x, y)
    assert routed == [(700, 0), (300, 1)]
    start = 0
    for slot, rows in segments:
        part = slice(start, start + rows)
        if slot is None:
            assert torch.equal(y[part], torch.zeros_like(y[part]))
        else:
            torch.testing.assert_close(y[part].float(), x[part].float() @ weights[slot].float().T, atol=3e-2,
                                       rtol=1e-2)
        start += rows


@pytest.mark.parametrize("group,sp2,want_layout", [(128, True, "sp2"), (None, True, "sp2"), (128, False, "dense2"),
                                                   (32, True, "dense2")])
def test_two_bit_symmetric_deltas_load_as_sp2_when_asked_and_match_the_canonical_reference(group, sp2, want_layout):
    """DeviceSlots(sp2=True) on CUDA stores a 2-bit symmetric 2:4 delta with scales per row or per 128 columns in the
    2-bit sparse-MMA order (the bytes of spmma_layout.pack_sp2; unwritten slots keep meta 0x44444444); off, or with
    groups of 32 columns, it goes to dense2 words. The step's kernel launch (kernels/sbmm_spmma2.py on sp2 stacks) and
    apply_deltas on the same stack equal the canonical dequantize-then-matmul, and an empty slot adds nothing."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import packing, spmma_layout
    from kernels.delta_linear import PackedDeltaStack, apply_deltas
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from tests.kernels.packed_factory import random_packed

    n, k = 512, 1024
    p = random_packed(n, k, 2, group, True, generator=torch.Generator().manual_seed(8))
    delta = DeltaTensor("w.weight", "sparse24", (n, k), 2, group, True,
                        **{f: p[f] for f in ("qweight", "meta", "scales")})
    slots = DeviceSlots(3, "cuda", torch.float16, {"w.weight"}, tie_word_embeddings=False, sp2=sp2)
    slots.write(1, "d", {"w.weight": delta})
    stack = slots.stack(1, "w.weight")
    assert stack.layout == want_layout and stack.sp2 == (want_layout == "sp2")
    w = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 2, (n, k)).to("cuda", torch.float16)
    x = torch.randn(9, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(9, n, device="cuda", dtype=torch.float16)
    StepDeltaOps(slots, [(1, 5), (0, 2), (2, 2)]).linear("w", x, y)
    torch.testing.assert_close(y[:5].float(), x[:5].float() @ w.float().T, atol=3e-2, rtol=1e-2)
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))
    if want_layout != "sp2":
        return
    qweight, meta = spmma_layout.pack_sp2(p["qweight"], p["meta"])
    assert torch.equal(stack.parts["qweight"][1].cpu(), qweight) and torch.equal(stack.parts["meta"][1].cpu(), meta)
    assert torch.all(stack.parts["meta"][0] == 0x44444444)
    parts = stack.parts
    kernel_stack = PackedDeltaStack(qweight=parts["qweight"], meta=parts["meta"], scales=parts["scales"], zeros=None,
                                    bits=2, group_size=group or k, sym=True, shape=(n, k), sp2=True)
    y = torch.zeros(9, n, device="cuda", dtype=torch.float16)
    apply_deltas(x, y, kernel_stack, torch.tensor([0, 5, 7, 9]), torch.tensor([1, 0, -1]))
    torch.testing.assert_close(y[:5].float(), x[:5].float() @ w.float().T, atol=3e-2, rtol=1e-2)
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))


def test_two_bit_deltas_load_as_dense2_words_and_match_the_canonical_reference():
    """DeviceSlots on CUDA re-encodes a 2-bit 2:4 delta to dense2 words (no meta), and the kernel over that
    stack equals the canonical dequantize-then-matmul; an empty slot adds nothing."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import layout, packing
    from kernels.delta_linear import PackedDeltaStack, apply_deltas
    from services.worker.device_slots import DeviceSlots
    from tests.kernels.packed_factory import random_packed

    n, k = 256, 1024
    p = random_packed(n, k, 2, 128, True, generator=torch.Generator().manual_seed(0))
    delta = DeltaTensor("w", "sparse24", (n, k), 2, 128, True, **{f: p[f] for f in ("qweight", "meta", "scales")})
    slots = DeviceSlots(2, "cuda", torch.float16, {"w"}, tie_word_embeddings=False)
    slots.write(1, "d", {"w": delta})
    stack = slots.stack(1, "w")
    assert "meta" not in stack.parts and tuple(stack.parts["qweight"].shape) == (2, n, k // 16)
    assert torch.equal(stack.parts["qweight"][1].cpu(), layout.to_dense2_reference(p["qweight"], p["meta"], k))
    kernel_stack = PackedDeltaStack(qweight=stack.parts["qweight"], meta=None, scales=stack.parts["scales"],
                                    zeros=None, bits=2, group_size=128, sym=True, shape=(n, k))
    x = torch.randn(6, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(6, n, device="cuda", dtype=torch.float16)
    apply_deltas(x, y, kernel_stack, torch.tensor([0, 3, 6]), torch.tensor([1, 0]))
    w = packing.dequantize(p["qweight"], p["scales"], None, p["meta"], 2, (n, k)).to("cuda", torch.float16)
    torch.testing.assert_close(y[:3].float(), (x[:3].float() @ w.float().T), atol=2e-2, rtol=1e-2)
    assert torch.equal(y[3:], torch.zeros_like(y[3:]))


def test_dense_two_bit_deltas_load_as_dense2_words_and_match_the_reference():
    """A dense (unpruned) 2-bit delta on CUDA goes into a dense2 stack too and runs on the same kernel path."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from kernels import packing
    from kernels.delta_linear import PackedDeltaStack, apply_deltas
    from services.worker.device_slots import DeviceSlots

    n, k, group = 256, 1024, 128
    g = torch.Generator().manual_seed(1)
    qweight = packing.pack_codes(torch.randint(0, 4, (n, k), generator=g), 2)
    scales = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half()
    delta = DeltaTensor("w", "quant", (n, k), 2, group, True, qweight=qweight, scales=scales)
    slots = DeviceSlots(1, "cuda", torch.float16, {"w"}, tie_word_embeddings=False)
    slots.write(0, "d", {"w": delta})
    stack = slots.stack(0, "w")
    assert stack.layout == "dense2" and "meta" not in stack.parts
    kernel_stack = PackedDeltaStack(qweight=stack.parts["qweight"], meta=None, scales=stack.parts["scales"],
                                    zeros=None, bits=2, group_size=group, sym=True, shape=(n, k))
    x = torch.randn(4, k, device="cuda", dtype=torch.float16)
    y = torch.zeros(4, n, device="cuda", dtype=torch.float16)
    apply_deltas(x, y, kernel_stack, torch.tensor([0, 4]), torch.tensor([0]))
    w = delta.dequantize(torch.float32).to("cuda")
    torch.testing.assert_close(y.float(), x.float() @ w.T, atol=3e-2, rtol=1e-2)


def test_baseline_host_transforms_on_the_gpu_equal_the_cpu_ones(tmp_path):
    """dense-delta's dequantize and swap's merge computed on the GPU (DeviceMath) give the CPU's tensors, pinned."""
    from bench.synthetic import shape_config, write_base, write_delta
    from deltazip.artifact import load_delta
    from deltazip.model.loader import load_model
    from services.worker.modes import DeviceMath, dense_fp16, merged_weights

    config = shape_config("tiny")
    base_dir = write_base(tmp_path / "base", config)
    packed = load_delta(write_delta(base_dir, tmp_path / "ft", config, bits=4, group_size=32), "cpu")
    assert {d.kind for d in packed.values()} & {"sparse24", "quant"}
    base = {k: p.detach().to("cpu", torch.float16) for k, p in load_model(base_dir, "cpu").named_parameters()}
    math = DeviceMath(torch.device("cuda"))
    for on_cpu, on_gpu in [(dense_fp16(packed), dense_fp16(packed, math)),
                           (merged_weights(base, packed), merged_weights(base, packed, math))]:
        assert on_cpu.keys() == on_gpu.keys()
        for name, want in on_cpu.items():
            got = on_gpu[name]
            want, got = (getattr(t, "delta", t) for t in (want, got))
            assert got.device.type == "cpu" and got.dtype == want.dtype
            if name in packed and packed[name].kind != "dense":
                assert got.is_pinned()
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-3)


def test_paged_attention_backend_list_gives_torchs_own_result():
    """The paged path's SDPA backends (no cuDNN attention) compute what PyTorch's own choice does, on a mixed
    step: two prompt chunks of different lengths and three decode rows over a paged cache."""
    from deltazip.model import attention
    from deltazip.model.context import AttentionMetadata

    g = torch.Generator(device="cuda").manual_seed(0)
    heads, dim, block = 8, 128, 16
    k_cache = torch.randn(64, block, heads, dim, device="cuda", dtype=torch.float16, generator=g)
    v_cache = torch.randn(64, block, heads, dim, device="cuda", dtype=torch.float16, generator=g)
    q_lens, ctx_lens = [37, 1, 90, 1, 1], [37, 50, 130, 17, 64]
    tables = torch.arange(5 * 9, device="cuda").view(5, 9)  # sequence i owns blocks 9i..9i+8
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device="cuda")
    meta = AttentionMetadata(positions=torch.zeros(sum(q_lens), dtype=torch.long, device="cuda"),
                             slot_mapping=torch.zeros(sum(q_lens), dtype=torch.long, device="cuda"),
                             block_tables=tables, context_lens=torch.tensor(ctx_lens, device="cuda"),
                             query_start_loc=qsl, max_query_len=max(q_lens), max_context_len=max(ctx_lens))
    q = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=torch.float16, generator=g)
    ours = attention.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5)
    saved, attention.PAGED_BACKENDS = attention.PAGED_BACKENDS, None
    try:
        theirs = attention.paged_attention(q, k_cache, v_cache, meta, dim ** -0.5)
    finally:
        attention.PAGED_BACKENDS = saved
    assert ours.shape == (sum(q_lens), heads, dim)
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)
