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


def test_engine_counts_variants_compiled_inside_a_step_but_not_by_its_warm_up(monkeypatch):
    engine = LLMEngine(random_model(tiny_config(), seed=0), EngineConfig(num_kv_blocks=32, block_size=8),
                       eos_token_ids=[])
    engine._watch_compiles = True  # as on CUDA
    counts = iter([10, 13, 13, 13, 20, 26])  # before / after each step's forward
    monkeypatch.setattr(compile_watch, "compiled_variants", lambda kernels=None: next(counts))
    warmups = iter([(0.0, 0), (0.0, 0), (0.5, 6)])  # the third step warms up first and compiles 6 variants there

    run = engine.runner.run

    def run_with_warmup(items):
        seconds, variants = next(warmups)
        time.sleep(seconds)  # the warm-up runs inside the runner's run, before the forward
        out = run(items)
        engine.runner.last_warmup_s, engine.runner.last_warmup_variants = seconds, variants
        return out

    monkeypatch.setattr(engine.runner, "run", run_with_warmup)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    phases = engine.profile.snapshot()
    assert phases["compile"][0] == 3  # step 1: 13 - 10; step 2: none; step 3: 26 - 20 - 6 by the warm-up = 0
    assert phases["warmup"] == (1, 0.5)
    assert phases["prefill"][0] + phases["decode_eager"][0] == 3
    assert 0.0 <= phases["decode_eager"][1] < 0.5  # the warm-up's seconds are not the forward's
