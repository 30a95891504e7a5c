"""bench/serve_points.settle_kernels: wait for a worker's kernel warm-up count to go quiet, bounded."""

from bench import serve_points


def _fake_counts(monkeypatch, counts):
    """_kernel_phases answers the next count of `counts` per call (the last one from then on); no real sleep."""
    it = iter(counts)
    last = [counts[0]]
    clock = [0.0]

    async def phases(address):
        last[0] = next(it, last[0])
        return {"warmup": {"count": last[0], "seconds": 0.0}}

    monkeypatch.setattr(serve_points, "_kernel_phases", phases)
    monkeypatch.setattr(serve_points.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(serve_points.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))


def test_settles_once_the_count_stays_put(monkeypatch):
    _fake_counts(monkeypatch, [3, 4, 5, 5, 6, 7])  # still warming for 3 s of polls, then quiet
    out = serve_points.settle_kernels("w", 60.0)
    assert out["settled"] and out["slices"] == 4
    assert out["waited_s"] >= serve_points.SETTLE_QUIET_S + 2.5


def test_gives_up_at_the_limit(monkeypatch):
    _fake_counts(monkeypatch, list(range(1000)))  # never quiet
    out = serve_points.settle_kernels("w", 5.0)
    assert not out["settled"] and 5.0 <= out["waited_s"] < 6.0


def test_a_worker_that_does_not_answer_is_not_waited_for(monkeypatch):
    async def broken(address):
        raise ConnectionError("no worker")

    monkeypatch.setattr(serve_points, "_kernel_phases", broken)
    out = serve_points.settle_kernels("w", 60.0)
    assert out["settled"] is False and out["slices"] == 0 and out["waited_s"] < 1.0
