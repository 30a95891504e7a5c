"""The engine with the CUDA attention and rotary kernels forced on, run under the CPU interpreter: chunked prefills,
mixed steps and decode steps give the tokens of the torch paths (the kernels' own tests check their math; this
checks what the engine hands them: padded block tables, query starts, context lengths, slots)."""

import pytest
from engine_fixtures import CFG, one_torch_thread, prompts  # noqa: F401 (autouse fixture)

from deltazip.model import attention, layers
from deltazip.model.loader import model_from_state_dict
from deltazip.model.sampling import SamplingParams
from deltazip.model.synthetic import random_state_dict
from kernels import paged_attention, rope_kv
from kernels.sbmm_plan import interpreting
from services.worker.engine.engine import EngineConfig, LLMEngine

pytestmark = pytest.mark.skipif(not interpreting(), reason="the kernels run on CPU only under TRITON_INTERPRET=1")
KERNELS = {"decode": (paged_attention, "paged_decode_attention"), "varlen": (paged_attention, "paged_varlen_attention"),
           "rope": (rope_kv, "rope_store_kv")}
ORIGINALS = {name: getattr(module, attr) for name, (module, attr) in KERNELS.items()}


def generate(on: bool, monkeypatch) -> tuple[dict, dict]:
    calls = {"decode": 0, "varlen": 0, "rope": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention, "decode_kernel_applies", lambda device: on)
    monkeypatch.setattr(attention, "prefill_kernel_applies", lambda device: on)
    monkeypatch.setattr(layers, "fused_rope_kv_applies", lambda device: on)
    for name, (module, attr) in KERNELS.items():
        monkeypatch.setattr(module, attr, counted(name, ORIGINALS[name]))
    model = model_from_state_dict(CFG, random_state_dict(CFG, seed=3))
    # a 16-token budget: the longer prompts prefill in chunks, beside the running sequences' decode rows
    engine = LLMEngine(model, EngineConfig(block_size=4, num_kv_blocks=80, max_num_seqs=6,
                                           max_num_batched_tokens=16), eos_token_ids=[])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(prompts(5, seed=21, min_len=2, max_len=30)):
        engine.add_request(f"r{i}", p, params)
    tokens = {k: v[0] for k, v in engine.run_until_done().items()}
    return tokens, calls


def test_kernels_forced_on_give_the_torch_paths_tokens(monkeypatch):
    off, calls_off = generate(False, monkeypatch)
    on, calls = generate(True, monkeypatch)
    assert calls_off == {"decode": 0, "varlen": 0, "rope": 0}
    assert calls["decode"] > 0 and calls["varlen"] > 0 and calls["rope"] > 0
    assert on == off
