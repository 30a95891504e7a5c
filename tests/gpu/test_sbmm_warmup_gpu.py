"""SBMM warm-up on CUDA: once a worker's stacks are warmed, no step compiles an SBMM kernel. Skips without CUDA.

Run: TRITON_INTERPRET= PYTHONPATH=. python -m pytest -q tests/gpu/test_sbmm_warmup_gpu.py
"""

import random
import time

import pytest
import torch
import triton
import triton.language as tl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = {"hidden_size": 256, "intermediate_size": 384, "head_dim": 64}  # 4-bit linears tile as sp4


def _model_and_slots(dtype, sp2: bool, num_slots: int = 8):
    from deltazip.model.layers import NamedLinear
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from services.worker.device_slots import DeviceSlots
    from tests.unit.worker.test_graph_deltas import make_delta

    cfg = tiny_config(vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True, **SHAPE)
    model = model_from_state_dict(cfg, {k: v.to("cuda", dtype) for k, v in random_state_dict(cfg, seed=3).items()})
    names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(num_slots, "cuda", dtype, names, tie_word_embeddings=True, sp2=sp2)
    for slot in range(6):  # three 4-bit deltas (sp4), three 2-bit (sp2 or dense2; K = 384 stays dense2)
        slots.write(slot, f"d{slot}", make_delta(model, 4 if slot % 2 else 2, 10 + slot, with_dense=slot == 0,
                                                 group=128))
    return model, slots


def _sbmm_variants() -> int:
    from kernels import compile_watch

    return compile_watch.compiled_variants()  # the SBMM kernels' (compile_watch.sbmm_kernels)


@triton.jit
def _fill(out_ptr, VALUE: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, 16), tl.full([16], VALUE, tl.int32))


def test_compiled_variants_counts_a_fresh_compile_and_not_a_cached_launch():
    """The positive control of the tests below: a new variant adds one, its second launch none; the default
    count covers all four SBMM kernels."""
    from kernels import compile_watch

    out = torch.zeros(16, dtype=torch.int32, device="cuda")
    value = int(time.time_ns() % 1_000_003)  # a variant no earlier test compiled
    before = compile_watch.compiled_variants([_fill])
    _fill[(1,)](out, VALUE=value)
    after_first = compile_watch.compiled_variants([_fill])
    _fill[(1,)](out, VALUE=value)
    torch.cuda.synchronize()
    assert (after_first - before, compile_watch.compiled_variants([_fill]) - after_first) == (1, 0)
    assert int(out[0]) == value
    assert len(compile_watch.sbmm_kernels()) == 4  # Gluon, sp4, sp2 and the portable kernel on this GPU


@pytest.mark.parametrize("sp2, sliced", [(False, False), (True, False), (True, True)])
def test_warmed_stacks_take_any_call_in_bounds_without_a_compile(sp2, sliced):
    """warm_up over every stack (sliced: in slices that each stop after their first launch, until every stack
    says finished), then random eager calls (T <= max_tokens rows, S <= max_segments segments, mixed base and
    delta segments) and graph-shaped ones (padded segments, hints): no SBMM compile."""
    from kernels import sbmm, sbmm_warmup

    model, slots = _model_and_slots(torch.float16, sp2)
    max_tokens, max_segments, graph_rows, graph_segments = 96, 6, (1, 2, 4, 8, 16), 6
    seen: set = set()
    stacks = [s for s in slots.stacks() if s.kind != "dense"]
    assert {s.layout for s in stacks} >= ({"sp4", "sp2"} if sp2 else {"sp4", "dense2"})
    launched, slices = 0, 0
    for s in stacks:
        while True:
            warmed = sbmm_warmup.warm_up(s.parts["qweight"], s.parts.get("meta"), s.parts["scales"],
                                         s.parts.get("zeros"), s.bits, torch.float16, max_tokens, max_segments,
                                         graph_rows, graph_segments, tiled=s.tiled, sp4=s.sp4, sp2=s.sp2, seen=seen,
                                         deadline=0.0 if sliced else None)
            launched, slices = launched + warmed.launched, slices + 1
            assert warmed.launched <= 1 or not sliced
            if warmed.finished:
                break
    assert launched > 0 and (slices > len(stacks) if sliced else slices == len(stacks))
    variants = _sbmm_variants()
    rng = random.Random(0)
    for _ in range(60):
        s = stacks[rng.randrange(len(stacks))]
        graph = rng.random() < 0.3
        t = rng.choice(graph_rows) if graph else rng.randint(1, max_tokens)
        num = graph_segments if graph else rng.randint(1, min(t, max_segments))
        live = rng.randint(1, min(num, t))
        cuts = sorted(rng.sample(range(1, t), live - 1)) if live > 1 else []
        starts = [0, *cuts, t] + [t] * (num - live)
        seg_slots = [rng.choice([-1, *range(6)]) for _ in range(live)] + [-1] * (num - live)
        if graph:
            buf = torch.tensor(starts + seg_slots, dtype=torch.int64, device="cuda")
            st, sl = buf[: num + 1], buf[num + 1:]
            hints = {"rows_hint": sbmm.rows_bucket(torch.device("cuda"), max(starts[i + 1] - starts[i]
                                                                               for i in range(live))),
                     "segments_hint": 1 << max(0, live - 1).bit_length()}
        else:
            st = torch.tensor(starts, dtype=torch.int64, device="cuda")
            sl = torch.tensor(seg_slots, dtype=torch.int64, device="cuda")
            hints = {}
        n, k = s.shape
        x = torch.randn(t, k, dtype=torch.float16, device="cuda")
        y = torch.zeros(t, n, dtype=torch.float16, device="cuda")
        sbmm.sbmm(x, y, s.parts["qweight"], s.parts.get("meta"), s.parts["scales"], s.parts.get("zeros"), st, sl,
                  s.bits, tiled=s.tiled, sp4=s.sp4, sp2=s.sp2, **hints)
    torch.cuda.synchronize()
    assert _sbmm_variants() == variants, "an SBMM call compiled after the warm-up"


@pytest.mark.parametrize("idle", [False, True])
def test_engine_warms_up_and_no_step_after_it_compiles_an_sbmm_kernel(idle):
    """A CUDA engine with graphs over packed delta stacks warms up in slices (the profile's `warmup` phase): when
    idle (`warm_up`, as the engine loop calls it, given the slots) or else in the steps with delta rows. A random
    workload (mixed prompts, up to 6 deltas a batch, chunked prefill, graph decode) compiles no SBMM kernel once
    the warm-up finished, and none at all after an idle warm-up; the profile's `compile` phase says so."""
    from deltazip.model.sampling import SamplingParams
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.engine.engine import EngineConfig, LLMEngine

    model, slots = _model_and_slots(torch.float16, sp2=True)

    def provider(segments):
        if all(name is None for name, _ in segments):
            return None
        return StepDeltaOps(slots, [(None if n is None else int(n), rows) for n, rows in segments])

    engine = LLMEngine(model, EngineConfig(num_kv_blocks=256, block_size=16, max_num_seqs=16, cuda_graphs=True,
                                           max_deltas_per_batch=6, max_num_batched_tokens=128),
                       eos_token_ids=[], deltas_provider=provider, kernel_slots=slots if idle else None)
    if idle:
        slices = 0
        while engine.warm_up():  # as the engine loop calls it: slices until one finds nothing to do
            slices += 1
            assert slices < 10_000
        assert slices >= 1 and engine.profile.snapshot()["warmup"][0] == slices
        assert engine.runner.warmed is not None
    rng = random.Random(1)
    variants = in_step = None  # SBMM variants, and compiles inside steps, once the warm-up finished
    for wave in range(4):
        for i in range(12):
            delta = rng.choice([None, "0", "1", "2", "3", "4", "5"])
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 8), ignore_eos=True)
            engine.add_request(f"w{wave}r{i}", [rng.randrange(3, 250) for _ in range(rng.randint(1, 150))],
                               params, delta=delta)
        for _ in range(400):
            if not engine.has_unfinished_requests():
                break
            engine.step()
            if variants is None and engine.runner.warmed is not None:
                variants = _sbmm_variants()
                in_step = engine.profile.snapshot().get("compile", (0, 0.0))[0]
        assert not engine.has_unfinished_requests()
    phases = engine.profile.snapshot()
    assert phases["warmup"][0] >= 1, phases
    assert phases["decode_graph"][0] > 0, phases
    assert variants is not None and _sbmm_variants() == variants, "a step compiled an SBMM kernel after the warm-up"
    assert phases.get("compile", (0, 0.0))[0] == in_step, phases  # none once the warm-up finished
    if idle:
        assert in_step == 0, phases  # warmed before the first step: no step ever compiled
