"""The engine loop warms kernels up while idle: it calls the engine's optional `warm_up` when no request is open,
again at once while that reports work, and serves requests as before."""

import time

from services.worker.engine_loop import EngineLoop
from tests.unit.worker.test_worker_app import FakeEngine, wait_until


class WarmingEngine(FakeEngine):
    """FakeEngine with `warm_up`: reports work for its first `rounds` calls (each taking `round_s`)."""

    def __init__(self, rounds: int, round_s: float = 0.01):
        super().__init__(lambda delta: True)
        self.rounds, self.round_s, self.calls, self.busy_calls = rounds, round_s, 0, 0

    def warm_up(self) -> bool:
        self.calls += 1
        if self.reqs:
            self.busy_calls += 1  # never called with a request open
        if self.calls <= self.rounds:
            time.sleep(self.round_s)
            return True
        return False


def test_loop_calls_warm_up_while_idle_until_it_reports_no_work_then_keeps_serving():
    engine = WarmingEngine(rounds=3)
    loop = EngineLoop(engine, idle_wait_s=0.005)
    loop.start()
    try:
        assert wait_until(lambda: engine.calls >= 4)  # 3 rounds of work back to back, then one with none
        rounds_done = time.monotonic()
        assert wait_until(lambda: engine.calls >= 5, timeout_s=1.0)  # idle slices keep asking
        assert time.monotonic() - rounds_done >= 0.05  # ...after an idle wait, not in a spin
        events = []
        loop.submit("r1", [1, 2], _sampling(3), None, events.append)
        assert wait_until(lambda: any(e.finished for e in events))
        assert "".join(e.text for e in events) == "abc"
        assert engine.busy_calls == 0
    finally:
        loop.stop()


def _sampling(max_tokens: int):
    from deltazip.model.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0)
