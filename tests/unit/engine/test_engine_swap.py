"""The `swap` baseline in the engine: merged weights swapped in one model at a time, same tokens as the
merged references, never two models in one batch, and aging lets a waiting model in under a steady stream."""

import pytest
import torch
from engine_fixtures import Fixture, one_torch_thread, prompts  # noqa: F401 (autouse fixture)

from deltazip.model.sampling import SamplingParams
from services.worker.engine.batch_scheduler import BASE_MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def fx():
    return Fixture(num_deltas=3)


def merged_host(fx):
    """delta name -> full merged weights (what the host tier holds in swap mode)."""
    tables = {name: {k: v + delta[k] for k, v in fx.base_sd.items()} for name, delta in fx.deltas.items()}
    return tables.get


class BatchModels:
    """Wraps the engine's runner.run and records which models each batch mixed."""

    def __init__(self, engine):
        self.per_batch, inner = [], engine.runner.run

        def run(items):
            self.per_batch.append({s.delta or BASE_MODEL for s, _ in items})
            return inner(items)

        engine.runner.run = run


def test_swap_mode_matches_merged_models_one_model_per_batch(fx):
    ps = prompts(12, seed=5)
    deltas = [[None, "ft0", "ft1", "ft2"][i % 4] for i in range(12)]
    engine = fx.engine(num_kv_blocks=200, max_deltas_per_batch=4, swap_weights=merged_host(fx))
    batches = BatchModels(engine)
    for i, (p, d) in enumerate(zip(ps, deltas)):
        engine.add_request(f"r{i}", p, GREEDY, delta=d)
    results = engine.run_until_done()
    for i, (p, d) in enumerate(zip(ps, deltas)):
        assert results[f"r{i}"][0] == fx.reference(d, p, GREEDY.max_tokens), f"request {i} (delta {d})"
    assert max(len(m) for m in batches.per_batch if m) == 1
    assert engine.swapper.num_swaps >= 3  # ft0, ft1, ft2 at least (base is active at start)


def test_swap_mode_restores_base_weights(fx):
    engine = fx.engine(num_kv_blocks=50, swap_weights=merged_host(fx))
    p = prompts(1, seed=6)[0]
    engine.add_request("a", p, GREEDY, delta="ft1")
    engine.run_until_done()
    engine.add_request("b", p, GREEDY, delta=None)
    assert engine.run_until_done()["b"][0] == fx.reference(None, p, GREEDY.max_tokens)
    for name, param in engine.swapper.params.items():
        assert torch.equal(param, fx.base_sd[name])


def test_swap_mode_waits_for_host_weights_without_blocking_others(fx):
    available = {"ft0": False}
    table = merged_host(fx)
    engine = fx.engine(num_kv_blocks=100, swap_weights=lambda n: table(n) if available.get(n, True) else None)
    ps = prompts(2, seed=7)
    engine.add_request("d", ps[0], GREEDY, delta="ft0")
    engine.add_request("b", ps[1], GREEDY, delta=None)
    out = {}
    for _ in range(30):
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    assert out["b"] == fx.reference(None, ps[1], 8) and "d" not in out
    available["ft0"] = True
    assert engine.run_until_done()["d"][0] == fx.reference("ft0", ps[0], 8)


def test_swap_mode_aging_swaps_under_a_steady_stream(fx):
    clock = [0.0]
    engine = fx.engine(num_kv_blocks=400, max_delta_wait_s=1.0, swap_weights=merged_host(fx),
                       clock=lambda: clock[0])
    ps = prompts(40, seed=8)
    long = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("base0", ps[0], long, delta=None)
    engine.step()
    engine.add_request("delta", ps[1], long, delta="ft2")
    done_at = None
    for step in range(1, 60):  # a new base request every step keeps the base busy forever
        clock[0] += 0.2
        engine.add_request(f"base{step}", ps[2 + step % 30], long, delta=None)
        if any(o.request_id == "delta" and o.finish_reason for o in engine.step()):
            done_at = step
            break
    assert done_at is not None, "the delta request starved behind a stream of base requests"


def test_swap_mode_aged_model_without_host_weights_does_not_stall_the_active_one(fx):
    clock = [0.0]
    table = merged_host(fx)
    engine = fx.engine(num_kv_blocks=100, max_delta_wait_s=0.5, clock=lambda: clock[0],
                       swap_weights=lambda n: None if n == "ft1" else table(n))  # ft1 still fetching
    ps = prompts(3, seed=10)
    engine.add_request("b1", ps[0], GREEDY, delta=None)
    engine.step()  # b1 runs
    engine.add_request("d", ps[1], GREEDY, delta="ft1")
    clock[0] = 5.0  # d is old by now, but its weights are not on the host: no reason to drain the base
    engine.add_request("b2", ps[2], GREEDY, delta=None)
    assert "b2" in {o.request_id for o in engine.step()}
