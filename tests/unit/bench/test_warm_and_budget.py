"""The warm-state plan per worker mode, and the run budget's point skipping (no processes)."""

from bench.run_budget import RunBudget
from bench.warm import TierBudget, plan

NAMES = [f"ft-{i:03d}" for i in range(8)]


def test_delta_modes_fill_slots_then_host_most_popular_first():
    budget = TierBudget(num_device_slots=3, device_cache_bytes=0, host_cache_bytes=5 * 100)
    tiers = plan(NAMES, "delta", budget, model_bytes=100)
    assert tiers == {"ft-000": "device", "ft-001": "device", "ft-002": "device", "ft-003": "host", "ft-004": "host"}
    assert plan(NAMES, "dense-delta", budget, model_bytes=250) == {"ft-000": "device", "ft-001": "device"}


def test_device_bytes_bind_before_slots_and_unknown_size_plans_all():
    budget = TierBudget(num_device_slots=4, device_cache_bytes=250, host_cache_bytes=10_000)
    assert list(plan(NAMES, "delta", budget, model_bytes=100).values()).count("device") == 2
    assert len(plan(NAMES, "delta", budget, model_bytes=0)) == len(NAMES)


def test_swap_is_warmed_to_host_only_and_at_least_one_model():
    budget = TierBudget(num_device_slots=1, device_cache_bytes=0, host_cache_bytes=1000)
    assert plan(NAMES, "swap", budget, model_bytes=300) == {"ft-000": "host", "ft-001": "host", "ft-002": "host"}
    assert plan(NAMES, "swap", budget, model_bytes=5000) == {"ft-000": "host"}  # the worker keeps the one it loads


def test_worker_budget_read_with_the_workers_own_parser(tmp_path):
    budget = TierBudget.of_worker(str(tmp_path), ["--num-device-slots=16", "--host-cache-bytes=1024", "--device=cpu"])
    assert budget == TierBudget(num_device_slots=16, device_cache_bytes=0, host_cache_bytes=1024)


def test_budget_keeps_each_later_mode_its_first_point():
    budget = RunBudget(total_s=100.0, reserve_s_per_mode=30.0, modes_after=2, last_point_s=5.0)
    budget.started_at -= 50.0  # 50 s left, 60 s kept for two modes
    assert budget.why_skip(first_of_mode=True) is None
    assert "a point takes ~5 s and 60 s are kept for the 2 mode run(s)" in budget.why_skip(first_of_mode=False)
    budget.modes_after = 1
    assert budget.why_skip(first_of_mode=False) is None  # 50 - 5 >= 30
    budget.last_point_s = 25.0
    assert budget.why_skip(first_of_mode=False) is not None  # 50 - 25 < 30
    budget.started_at -= 60.0
    assert budget.why_skip(first_of_mode=True) == "budget of 100 s spent"
    unbounded = RunBudget(total_s=0.0, reserve_s_per_mode=30.0, modes_after=2)
    assert unbounded.why_skip(first_of_mode=False) is None and unbounded.remaining_s() == float("inf")


def test_a_mode_starts_only_while_its_reserve_is_left():
    budget = RunBudget(total_s=100.0, reserve_s_per_mode=30.0)
    budget.started_at -= 60.0
    assert budget.why_skip_mode() is None
    budget.started_at -= 20.0
    assert budget.why_skip_mode() == "20 s left when its worker would start, less than the 30 s reserve"
    budget.started_at -= 30.0
    assert budget.why_skip_mode() == "budget of 100 s spent before its worker started"
    assert RunBudget(total_s=0.0, reserve_s_per_mode=30.0).why_skip_mode() is None


def test_record_says_where_each_fine_tune_ended_up():
    from bench.warm import record

    budget = TierBudget(num_device_slots=2, device_cache_bytes=0, host_cache_bytes=300)
    targets = plan(NAMES[:4], "delta", budget, model_bytes=100)
    held = {"ft-000": ("device", 100), "ft-001": ("host", 100), "ft-002": ("host", 100), "ft-003": ("disk", 100)}
    done = record("delta", NAMES[:4], targets, {}, held, budget, 100, 1.234)
    assert done["planned"] == {"device": 2, "host": 1} and done["prefetched"] == 3 and done["seconds"] == 1.23
    assert done["resident"] == {"device": 1, "host": 2, "disk": 1, "remote": 0}
    assert done["did_not_fit"] == ["ft-003"] and done["not_in_planned_tier"] == {"ft-001": "host"}
    nothing = record("swap", NAMES[:4], {}, {"ft-000": "NOT_FOUND: no such model"}, {}, budget, 0, 0.1)
    assert nothing["planned"] == {"host": 0} and nothing["did_not_fit"] == [] and nothing["resident"]["remote"] == 4
