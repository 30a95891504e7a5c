"""Workload generator statistics and trace round trip."""

import numpy as np
import pytest

from bench.workload import (Request, WorkloadConfig, arrival_times, generate, map_trace_models, read_trace, scaled,
                            with_model, write_trace, zipf_probabilities)

MODELS = tuple(f"ft-{i}" for i in range(8))


def test_zipf_shares_match_the_law():
    requests = generate(WorkloadConfig(MODELS, num_requests=20000, zipf_alpha=1.5, seed=1))
    counts = np.array([sum(r.model == m for r in requests) for m in MODELS]) / len(requests)
    expected = zipf_probabilities(len(MODELS), 1.5)
    np.testing.assert_allclose(counts, expected, atol=0.015)
    assert counts[0] > 2.5 * counts[1] > counts[2]  # 2**1.5 = 2.83


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0), ("gamma", 4.0)])
def test_arrival_rate_and_cv(arrival, cv):
    times = arrival_times(50000, 5.0, arrival, cv, np.random.default_rng(2))
    gaps = np.diff(times)
    assert times[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_seeded_and_lengths_bounded():
    cfg = WorkloadConfig(MODELS, num_requests=500, prompt_len_mean=40, prompt_len_max=64, output_len_mean=16,
                         output_len_max=24, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert a == b and len({r.id for r in a}) == 500
    assert all(1 <= len(r.prompt) <= 64 and 1 <= r.max_tokens <= 24 and r.min_tokens == r.max_tokens for r in a)
    assert np.mean([len(r.prompt) for r in a]) == pytest.approx(40, rel=0.1)
    assert generate(WorkloadConfig(MODELS, num_requests=500, seed=4)) != a


def test_trace_round_trip_and_replay_helpers(tmp_path):
    requests = generate(WorkloadConfig(MODELS, num_requests=50, seed=5))
    path = write_trace(requests, tmp_path / "trace.jsonl")
    assert read_trace(path) == requests
    base = with_model(requests, "base")
    assert {r.model for r in base} == {"base"} and [r.timestamp for r in base] == [r.timestamp for r in requests]
    assert scaled(requests, 2.0)[-1].timestamp == pytest.approx(requests[-1].timestamp / 2)


def test_trace_from_elsewhere_is_sorted_shifted_and_mapped(tmp_path):
    path = tmp_path / "ext.jsonl"
    path.write_text('{"id": "b", "prompt": "x", "timestamp": 12.5, "model": "m2", "min_tokens": 1, "max_tokens": 4}\n'
                    '\n{"id": "a", "prompt": "y", "timestamp": 10.0, "model": "m1", "max_tokens": 3}\n'
                    '{"id": "c", "prompt": "z", "timestamp": 11.0, "model": "m1", "max_tokens": 3}\n')
    requests = read_trace(path)
    assert [r.id for r in requests] == ["a", "c", "b"] and requests[0].timestamp == 0.0
    assert requests[0].min_tokens == 0
    mapped = map_trace_models(requests, ("ft-0", "ft-1"))
    assert [r.model for r in mapped] == ["ft-0", "ft-0", "ft-1"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="timestamp"):
        read_trace(tmp_path / "bad.jsonl")


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="arrival"):
        WorkloadConfig(MODELS, arrival="uniform")
    with pytest.raises(ValueError, match="at least one model"):
        WorkloadConfig(())
    assert isinstance(generate(WorkloadConfig(("only",), num_requests=1))[0], Request)


def test_only_models_change_with_the_number_of_models():
    few = generate(WorkloadConfig(MODELS[:2], num_requests=100, seed=6))
    many = generate(WorkloadConfig(MODELS, num_requests=100, seed=6))
    strip = lambda rs: [(r.id, r.prompt, r.timestamp, r.max_tokens) for r in rs]  # noqa: E731
    assert strip(few) == strip(many) and [r.model for r in few] != [r.model for r in many]
