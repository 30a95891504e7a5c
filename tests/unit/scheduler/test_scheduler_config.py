"""Scheduler flags: defaults are valid; a bad value names its flag."""

import pytest

from services.scheduler.config import parse_config


def test_defaults_and_tuning_flags():
    config = parse_config(["--max-queue-per-worker", "2", "--prefetch-interval-s", "0", "--scheduler-id", "s1"])
    assert (config.max_queue_per_worker, config.prefetch_interval_s, config.scheduler_id) == (2, 0.0, "s1")
    assert parse_config([]).scheduler_id  # hostname-pid by default


@pytest.mark.parametrize("argv, fragment", [
    (["--lease-s", "0"], "--lease-s must be positive"),
    (["--max-queue-per-worker", "-1"], "--max-queue-per-worker must be >= 0"),
    (["--lease-s", "1", "--worker-check-s", "2"], "--lease-s must exceed --worker-check-s"),
    (["--prefetch-tier", "disk"], "--prefetch-tier must be device or host"),
])
def test_bad_values_name_the_flag(argv, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_config(argv)
