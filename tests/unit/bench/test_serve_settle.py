"""bench/serve_points.settle_kernels: wait until the worker says no kernel warm-up is left, bounded."""

from bench import serve_points


def _fake_status(monkeypatch, replies):
    """_warming answers the next (warming, slices) of `replies` per call (the last one from then on); a fake clock."""
    it = iter(replies)
    last = [replies[0]]
    clock = [0.0]

    async def warming(address):
        last[0] = next(it, last[0])
        return last[0]

    monkeypatch.setattr(serve_points, "_warming", warming)
    monkeypatch.setattr(serve_points.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(serve_points.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))


def test_settles_once_the_worker_says_no_warm_up_is_left(monkeypatch):
    # a long slice (count unchanged for many polls) does not end the wait while the worker says it is warming
    _fake_status(monkeypatch, [(True, 3)] * 12 + [(True, 4), (False, 5), (True, 6), (False, 7), (False, 7)])
    out = serve_points.settle_kernels("w", 60.0)
    assert out == {"settled": True, "waited_s": 8.0, "slices": 4}


def test_gives_up_at_the_limit(monkeypatch):
    _fake_status(monkeypatch, [(True, 0)])
    out = serve_points.settle_kernels("w", 5.0)
    assert not out["settled"] and 5.0 <= out["waited_s"] < 6.0


def test_a_worker_that_does_not_answer_is_not_waited_for(monkeypatch):
    async def broken(address):
        raise ConnectionError("no worker")

    monkeypatch.setattr(serve_points, "_warming", broken)
    out = serve_points.settle_kernels("w", 60.0)
    assert out["settled"] is False and out["slices"] == 0 and out["waited_s"] < 1.0
