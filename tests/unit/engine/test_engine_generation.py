"""LLMEngine on a tiny float64 Llama with dense deltas: batched outputs equal merged-weight references."""

import pytest
from engine_fixtures import Fixture, one_torch_thread, prompts  # noqa: F401 (autouse fixture)

from deltazip.model.sampling import SamplingParams
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sequence import FinishReason

GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def fx():
    return Fixture(num_deltas=3)


def _submit(engine: LLMEngine, ps, deltas, params=GREEDY):
    for i, (p, d) in enumerate(zip(ps, deltas)):
        engine.add_request(f"r{i}", p, params, delta=d)


class SegmentRecorder:
    """Wraps a provider and records the distinct deltas of every call."""

    def __init__(self, inner):
        self.inner, self.deltas_per_call = inner, []

    def __call__(self, segments):
        self.deltas_per_call.append({d for d, _ in segments if d is not None})
        return self.inner(segments)


def test_mixed_deltas_match_merged_models(fx):
    ps = prompts(12, seed=1, max_len=40)
    deltas = [[None, "ft0", "ft1", "ft2"][i % 4] for i in range(12)]
    engine = fx.engine(num_kv_blocks=200, max_num_batched_tokens=32)  # small budget: chunked prefill
    _submit(engine, ps, deltas)
    results = engine.run_until_done()
    for i, (p, d) in enumerate(zip(ps, deltas)):
        ids, _, reason = results[f"r{i}"]
        expected = fx.reference(d, p, GREEDY.max_tokens)
        assert ids == expected, f"request {i} (delta {d})"
        assert reason == (FinishReason.STOP if expected[-1] == 2 else FinishReason.LENGTH)
    # The deltas really change the output: one prompt under every model gives >1 distinct continuation.
    assert len({tuple(fx.reference(d, ps[0], 10)) for d in (None, "ft0", "ft1", "ft2")}) > 1
    assert engine.num_free_blocks == 200


def test_prefill_first_matches_merged_models_with_prompts_arriving_mid_decode(fx):
    """prefill_first: prompts that arrive while others decode run in steps of their own, the decodes in the next
    step; every request still gets its merged model's greedy tokens, and no step mixes decodes and prompts while
    both wait."""
    ps = prompts(10, seed=4, max_len=30)
    deltas = [[None, "ft0", "ft1", "ft2"][i % 4] for i in range(10)]
    recorder = SegmentRecorder(fx.engine(num_kv_blocks=10).runner.deltas_provider)
    engine = fx.engine(num_kv_blocks=200, max_num_batched_tokens=24, prefill_first=True, deltas_provider=recorder)
    _submit(engine, ps[:4], deltas[:4])
    steps = []  # per step: (decodes, prompt chunks) scheduled
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        decodes = sum(1 for seq, n in batch.items if seq.num_output_tokens > 0 and n == 1)
        steps.append((decodes, len(batch.items) - decodes))
        return batch

    engine.scheduler.schedule = recorded
    results = {}
    for step in range(400):
        if step in (3, 5, 9):  # arrivals while the first requests decode
            for i in {3: (4, 5), 5: (6, 7), 9: (8, 9)}[step]:
                engine.add_request(f"r{i}", ps[i], GREEDY, delta=deltas[i])
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            ids, text, _ = results.get(out.request_id, ([], "", None))
            results[out.request_id] = (ids + out.token_ids, text + out.text, out.finish_reason)
    assert sorted(results) == [f"r{i}" for i in range(10)]
    for i, (p, d) in enumerate(zip(ps, deltas)):
        assert results[f"r{i}"][0] == fx.reference(d, p, GREEDY.max_tokens), f"request {i} (delta {d})"
    assert not [s for s in steps if s[0] and s[1]]  # no step mixed decodes with prompt chunks
    prompt_steps = [i for i, s in enumerate(steps) if s[1]]
    assert len(prompt_steps) >= 4  # the first prompts, then each arrival
    assert all(steps[i + 1][0] for i in prompt_steps[1:] if i + 1 < len(steps))  # decodes right after each
    assert engine.num_free_blocks == 200


def test_max_deltas_per_batch_two_with_three_deltas(fx):
    ps = prompts(9, seed=2)
    deltas = ["ft0", "ft1", "ft2"] * 3
    recorder = SegmentRecorder(fx.engine(num_kv_blocks=10).runner.deltas_provider)
    engine = fx.engine(num_kv_blocks=200, max_deltas_per_batch=2, deltas_provider=recorder)
    _submit(engine, ps, deltas)
    results = engine.run_until_done()
    assert all(results[f"r{i}"][0] == fx.reference(d, p, 10) for i, (p, d) in enumerate(zip(ps, deltas)))
    assert max(len(s) for s in recorder.deltas_per_call) == 2
    assert set().union(*recorder.deltas_per_call) == {"ft0", "ft1", "ft2"}


def test_preemption_keeps_outputs_identical(fx):
    ps = prompts(8, seed=3, min_len=10, max_len=20)
    deltas = [None, "ft0", "ft1", "ft2"] * 2
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = fx.engine(num_kv_blocks=24)  # 96 token slots for 8 sequences of up to 36 tokens
    _submit(engine, ps, deltas, params)
    results = engine.run_until_done()
    assert engine.scheduler.num_preemptions > 0
    for i, (p, d) in enumerate(zip(ps, deltas)):
        assert results[f"r{i}"][0] == fx.reference(d, p, 16, eos=None)
    assert engine.num_free_blocks == 24


def test_abort_frees_blocks_at_once(fx):
    engine = fx.engine(num_kv_blocks=64)
    ps = prompts(3, seed=4, min_len=12, max_len=12)
    _submit(engine, ps, [None, "ft0", "ft1"], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    held = 64 - engine.num_free_blocks
    assert held > 0
    seq = engine.scheduler.find("r1")
    blocks_of_r1 = len(seq.block_table)
    assert engine.abort("r1") is True
    assert engine.num_free_blocks == 64 - held + blocks_of_r1
    assert engine.abort("r1") is False and engine.abort("nope") is False
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.running_deltas) == (2, 0, ["ft1"])
    seen = {o.request_id for _ in range(3) for o in engine.step()}
    assert "r1" not in seen and seen == {"r0", "r2"}
    engine.abort("r0"), engine.abort("r2")
    assert engine.num_free_blocks == 64 and not engine.has_unfinished_requests()


def test_abort_of_queued_request(fx):
    engine = fx.engine(num_kv_blocks=16)
    engine.add_request("q", [5, 6, 7], GREEDY)
    assert engine.abort("q") and not engine.has_unfinished_requests()
    engine.add_request("q", [5, 6, 7], GREEDY)  # the id is free again


def test_max_tokens_and_min_tokens(fx):
    engine = fx.engine(num_kv_blocks=64)
    engine.add_request("a", [7, 8, 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.add_request("b", [7, 8, 9], SamplingParams(temperature=0.8, seed=3, max_tokens=7, min_tokens=7))
    results = engine.run_until_done()
    assert len(results["a"][0]) == 5 and results["a"][2] == FinishReason.LENGTH
    assert len(results["b"][0]) == 7 and 2 not in results["b"][0] and results["b"][2] == FinishReason.LENGTH


def test_seeded_sampling_is_reproducible_across_batches(fx):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=12, ignore_eos=True)
    p = prompts(1, seed=5)[0]
    alone = fx.engine(num_kv_blocks=64)
    alone.add_request("x", p, params, delta="ft1")
    first = alone.run_until_done()["x"][0]
    busy = fx.engine(num_kv_blocks=64, max_num_batched_tokens=16)
    _submit(busy, prompts(5, seed=6), [None, "ft0", "ft1", "ft2", None],
            SamplingParams(temperature=1.0, max_tokens=12))
    busy.add_request("x", p, params, delta="ft1")
    assert busy.run_until_done()["x"][0] == first
    other = fx.engine(num_kv_blocks=64)
    other.add_request("x", p, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12,
                                             ignore_eos=True), delta="ft1")
    assert other.run_until_done()["x"][0] != first


def test_request_for_unready_delta_waits_without_blocking(fx):
    ready = {"ft0"}
    engine = fx.engine(num_kv_blocks=64, is_delta_ready=lambda name: name in ready)
    ps = prompts(2, seed=7)
    engine.add_request("late", ps[0], GREEDY, delta="ft2")
    engine.add_request("now", ps[1], GREEDY, delta="ft0")
    outs = {}
    for _ in range(30):
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.token_ids)
    assert "late" not in outs and outs["now"] == fx.reference("ft0", ps[1], 10)
    assert engine.scheduler.waiting_deltas() == {"ft2"}
    ready.add("ft2")
    results = engine.run_until_done()
    assert results["late"][0] == fx.reference("ft2", ps[0], 10)


def test_invalid_requests_are_rejected(fx):
    engine = fx.engine(num_kv_blocks=8)  # 32 token slots
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match="at most 31"):
        engine.add_request("long", list(range(3, 40)), GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("s", [3, 4], SamplingParams(stop=["x"]))
    engine.add_request("dup", [3, 4], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [3, 4], GREEDY)


def test_delta_segments_count_every_delta_row_once(fx):
    """SegmentStats: every token row of a delta request that a forward ran is in one segment, binned by the
    segment's row count; base rows are not delta segments."""
    ps = prompts(8, seed=5, max_len=40)
    deltas = [None, "ft0", "ft1", "ft1"] * 2
    engine = fx.engine(num_kv_blocks=200, max_num_batched_tokens=32)
    _submit(engine, ps, deltas)
    results = engine.run_until_done()
    snap = engine.segments.snapshot()
    expected = sum(len(p) + len(results[f"r{i}"][0]) - 1 for i, (p, d) in enumerate(zip(ps, deltas)) if d)
    assert sum(rows for _, rows in snap.values()) == expected
    for (step, low), (num, rows) in snap.items():
        assert step in ("prefill", "decode") and low * num <= rows < 2 * low * num
    assert any(step == "decode" and low == 1 for step, low in snap)  # decode steps: one row per sequence
