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


def test_a_request_arriving_mid_warm_up_is_served_between_slices_and_the_warm_up_resumes_after_it():
    """A long warm-up in slices (100 x 20 ms, like model_runner.WARMUP_SLICE_S cuts a cold compile run): a request
    submitted during it finishes after at most about one slice, long before the warm-up would have ended, and
    the remaining slices run once the worker is idle again."""
    engine = WarmingEngine(rounds=100, round_s=0.02)
    loop = EngineLoop(engine, idle_wait_s=0.005)
    loop.start()
    try:
        assert wait_until(lambda: engine.calls >= 3)
        events = []
        submitted = time.monotonic()
        loop.submit("r1", [1, 2], _sampling(3), None, events.append)
        assert wait_until(lambda: any(e.finished for e in events))
        assert time.monotonic() - submitted < 0.5  # the whole warm-up is 2 s
        assert "".join(e.text for e in events) == "abc"
        assert engine.calls < 100 and engine.busy_calls == 0  # served mid-warm-up, no slice with a request open
        assert wait_until(lambda: engine.calls > 100, timeout_s=5.0)  # the warm-up resumed and finished
    finally:
        loop.stop()
