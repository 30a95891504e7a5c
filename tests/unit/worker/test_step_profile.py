"""StepProfile: cumulative per-phase totals, and the per-interval view the benchmark takes of two snapshots."""

import pytest

from services.worker.engine.step_profile import (PHASES, SegmentStats, StepProfile, phase_deltas, segment_bin,
                                                 segment_deltas)


def test_totals_grow_and_an_interval_is_the_difference_of_two_snapshots():
    profile = StepProfile()
    profile.add("schedule", 0.5)
    before = profile.snapshot()
    profile.add("decode_graph", 0.003)
    profile.add("decode_graph", 0.005)
    profile.add("schedule", 0.25)
    after = profile.snapshot()
    assert set(after) == set(PHASES) and after["decode_graph"] == (2, pytest.approx(0.008))
    interval = phase_deltas(before, after, wall_s=0.1)
    assert set(interval) == {"decode_graph", "schedule"}  # phases that did not run in the interval are left out
    assert interval["decode_graph"] == {"count": 2, "seconds": 0.008, "mean_ms": 4.0, "share": 0.08}
    assert interval["schedule"]["count"] == 1 and interval["schedule"]["share"] == 2.5


def test_timed_records_even_when_the_block_raises_and_unknown_phases_are_refused():
    profile = StepProfile()
    with pytest.raises(KeyError):
        with profile.timed("results"):
            raise KeyError("x")
    assert profile.snapshot()["results"][0] == 1
    with pytest.raises(AssertionError, match="unknown step phase"):
        profile.add("nap", 1.0)


def test_segment_stats_bin_delta_segments_by_rows_and_an_interval_is_a_difference():
    assert [segment_bin(r) for r in (1, 2, 3, 4, 63, 64, 127, 128, 2048)] == [1, 2, 2, 4, 32, 64, 64, 128, 2048]
    stats = SegmentStats()
    stats.add("decode", [("a", 1), (None, 7), ("b", 1)])  # base rows are not a delta segment
    before = stats.snapshot()
    stats.add("prefill", [("a", 70), ("b", 1), (None, 300), ("c", 100)])
    stats.add("decode", [("a", 3)])
    stats.add("decode", [(None, 4)])  # a base-only step changes nothing
    after = stats.snapshot()
    assert after == {("decode", 1): (2, 2), ("decode", 2): (1, 3), ("prefill", 1): (1, 1), ("prefill", 64): (2, 170)}
    assert segment_deltas(before, after) == {"decode": {"2": [1, 3]}, "prefill": {"1": [1, 1], "64": [2, 170]}}
    with pytest.raises(AssertionError, match="unknown step kind"):
        stats.add("decode_graph", [("a", 1)])
