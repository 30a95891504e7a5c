"""How the engine accounts for kernel compiles (kernels/compile_watch.py) and warm-ups in its step profile, on CPU
with the compile count faked: variants that appear during a step's forward are the `compile` phase, variants the
warm-up compiled are not, and a step's warm-up seconds leave its forward phase."""

import time
from types import SimpleNamespace

from deltazip.model.sampling import SamplingParams
from deltazip.model.synthetic import random_model, tiny_config
from kernels import compile_watch, sbmm_triton
from services.worker.engine.engine import EngineConfig, LLMEngine


class _Kernel:
    """Stands in for a JITFunction: a per-device cache of compiled variants."""

    def __init__(self, num: int):
        self.device_caches = {0: ({f"v{i}": object() for i in range(num)}, None, None, None, None)}


def test_compiled_variants_sums_each_kernels_device_caches():
    assert compile_watch.compiled_variants([_Kernel(2), _Kernel(3), SimpleNamespace()]) == 5
    assert compile_watch.compiled_variants([]) == 0
    sbmm_kernels = compile_watch.sbmm_kernels()  # the default: the SBMM kernels a step launches
    assert sbmm_triton._sbmm_kernel in sbmm_kernels and len(sbmm_kernels) == 4
    assert compile_watch.compiled_variants() == compile_watch.compiled_variants(sbmm_kernels)


def _engine() -> LLMEngine:
    return LLMEngine(random_model(tiny_config(), seed=0), EngineConfig(num_kv_blocks=32, block_size=8),
                     eos_token_ids=[])


def _three_steps(engine: LLMEngine, monkeypatch, around_run) -> dict:
    """One request's three steps with the runner's run wrapped (around_run(run, items)); the profile after."""
    run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda items: around_run(run, items))
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    return engine.profile.snapshot()


def test_engine_counts_variants_compiled_inside_a_step_but_not_by_its_warm_up(monkeypatch):
    engine = _engine()
    engine._watch_compiles = True  # as on CUDA
    counts = iter([10, 13, 13, 13, 20, 26])  # before / after each step's forward
    monkeypatch.setattr(compile_watch, "compiled_variants", lambda kernels=None: next(counts))
    warmups = iter([(0.0, 0), (0.0, 0), (0.5, 6)])  # the third step warms up first and compiles 6 variants there

    def run_with_warmup(run, items):
        seconds, variants = next(warmups)
        time.sleep(seconds)  # the warm-up runs inside the runner's run, before the forward
        out = run(items)
        engine.runner.last_warmup_s, engine.runner.last_warmup_variants = seconds, variants
        return out

    phases = _three_steps(engine, monkeypatch, run_with_warmup)
    assert phases["compile"][0] == 3  # step 1: 13 - 10; step 2: none; step 3: 26 - 20 - 6 by the warm-up = 0
    assert phases["warmup"] == (1, 0.5)
    assert phases["prefill"][0] + phases["decode_eager"][0] == 3
    assert 0.0 <= phases["decode_eager"][1] < 0.5  # the warm-up's seconds are not the forward's


def test_runner_warm_up_in_slices_marks_the_slots_warm_only_once_every_stack_finished(monkeypatch):
    """warm_up_kernels with a deadline: a stack cut at the deadline ends the slice, no further stack starts once
    the slice launched something past the deadline, and `warmed` is set by the slice that finishes the last
    stack (a later call has nothing to do)."""
    from kernels import sbmm_warmup
    from services.worker.engine import model_runner

    runner = _engine().runner
    stack = lambda name: SimpleNamespace(name=name, sbmm_readable=True, parts={"qweight": name, "scales": None},
                                         bits=4, tiled=False, sp4=True, sp2=False)
    slots = SimpleNamespace(device=SimpleNamespace(type="cuda"), layout_version=3, dtype=None,
                            stacks=lambda: [stack("a"), stack("b"), stack("c")])
    left = {"a": 3, "b": 1, "c": 2}  # variants each stack still has to compile
    clock, calls = [0.0], []

    def fake_warm_up(qweight, *args, deadline=None, **kwargs):
        calls.append(qweight)
        launched = 0
        while left[qweight]:
            left[qweight] -= 1
            launched += 1
            clock[0] += 1.0
            if deadline is not None and clock[0] >= deadline:
                return sbmm_warmup.Warmed(launched, False)  # cut: the real one never says finished here
        return sbmm_warmup.Warmed(launched, True)

    monkeypatch.setattr(sbmm_warmup, "warm_up", fake_warm_up)
    monkeypatch.setattr(model_runner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(model_runner.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(model_runner.compile_watch, "compiled_variants", lambda kernels=None: 0)

    assert runner.warm_up_if_stale(slots, budget_s=2.0) > 0  # a: 2 of 3, cut
    assert calls == ["a"] and runner.warmed is None
    runner.warm_up_if_stale(slots, budget_s=2.0)  # a: the last one; b: 1 -> past the deadline, cut there
    assert calls == ["a", "a", "b"] and runner.warmed is None
    runner.warm_up_if_stale(slots, budget_s=2.0)  # a, b: nothing left; c: 2 -> past the deadline
    assert runner.warmed is None and left == {"a": 0, "b": 0, "c": 0}
    runner.warm_up_if_stale(slots, budget_s=2.0)  # c reports finished: the slots are warm
    assert runner.warmed == (id(slots), 3)
    calls.clear()
    assert runner.warm_up_if_stale(slots, budget_s=2.0) == 0.0 and calls == []


def test_engine_counts_forwards_that_took_the_dense_route(monkeypatch):
    """A forward whose runner reports a dense-route segment (model_runner.last_dense_route) is counted in the nested
    `dense_route` phase with its forward seconds, beside its own prefill / decode phase."""
    engine = _engine()
    flags = iter([True, False, True])

    def run_and_flag(run, items):
        out = run(items)
        engine.runner.last_dense_route = next(flags)
        return out

    phases = _three_steps(engine, monkeypatch, run_and_flag)
    assert phases["dense_route"][0] == 2
    assert 0.0 < phases["dense_route"][1] <= phases["prefill"][1] + phases["decode_eager"][1]
