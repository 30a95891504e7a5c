"""A tensor-parallel follower warms its SBMM kernels up between commands (CPU, with the follower's parts faked):
slices while no command waits, commands first when one does, once per new stack layout, and a failed warm-up
only stops warming up."""

from types import SimpleNamespace

from kernels import sbmm_warmup
from services.worker import tp_follower
from services.worker.tp_protocol import Stop


class FakeConn:
    """A pipe end: `script` says, per poll, whether a command waits (Stop is sent once the script runs out)."""

    def __init__(self, script):
        self.script, self.polls, self.msgs = list(script), [], []

    def poll(self, timeout=0.0):
        self.polls.append(timeout)
        if not self.script:
            self.msgs.append(Stop())
            return True
        ready = self.script.pop(0)
        if ready is not None:
            self.msgs.append(ready)
            return True
        return False

    def recv(self):
        return self.msgs.pop(0)


def make_follower(conn, layout_version=1):
    f = object.__new__(tp_follower.Follower)
    stack = SimpleNamespace(sbmm_readable=True)
    f.rank, f.device, f.conn = 1, SimpleNamespace(type="cuda"), conn
    f.slots = SimpleNamespace(layout_version=layout_version, dtype=None, stacks=lambda: [stack])
    f.max_tokens, f.max_segments = 64, 6
    f.warmed_version, f.warm_seen, f.warm_failed = 0, set(), False
    return f


def test_follower_warms_up_in_slices_while_idle_then_polls_slowly(monkeypatch):
    results = iter([sbmm_warmup.Warmed(2, False), sbmm_warmup.Warmed(2, False), sbmm_warmup.Warmed(1, True)])
    calls = []

    def fake(stacks, dtype, max_tokens, max_segments, seen=None, deadline=None):
        calls.append((len(stacks), max_tokens, max_segments, deadline is not None, seen))
        return next(results)

    monkeypatch.setattr(sbmm_warmup, "warm_up_stacks", fake)
    conn = FakeConn([None] * 5)
    f = make_follower(conn)
    f.run()
    assert len(calls) == 3 and all(c[:4] == (1, 64, 6, True) for c in calls)
    assert all(c[4] is f.warm_seen for c in calls)  # one `seen` across slices
    assert f.warmed_version == 1
    assert conn.polls[:3] == [0, 0, 0]  # pending: look for commands without waiting between slices
    assert conn.polls[3:] == [tp_follower.IDLE_POLL_S] * 3  # warm: idle polls wait


def test_a_waiting_command_goes_before_the_next_slice(monkeypatch):
    calls = []
    monkeypatch.setattr(sbmm_warmup, "warm_up_stacks",
                        lambda *a, **k: calls.append(1) or sbmm_warmup.Warmed(1, False))
    handled = []
    conn = FakeConn([None, "cmd", None])
    f = make_follower(conn)
    monkeypatch.setattr(tp_follower, "Step", str)  # "cmd" is a Step: run() hands it to forward
    f.forward = handled.append
    f.run()
    assert handled == ["cmd"] and len(calls) == 2  # slice, command, slice, then Stop


def test_a_failed_warm_up_is_logged_once_and_serving_goes_on(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("ptxas died")

    monkeypatch.setattr(sbmm_warmup, "warm_up_stacks", boom)
    conn = FakeConn([None, None, None])
    f = make_follower(conn)
    f.run()
    assert f.warm_failed and not f.warm_pending()
    assert conn.polls == [0] + [tp_follower.IDLE_POLL_S] * 3


def test_nothing_to_warm_on_cpu_or_before_any_stack(monkeypatch):
    monkeypatch.setattr(sbmm_warmup, "warm_up_stacks", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    f = make_follower(FakeConn([]), layout_version=0)
    assert not f.warm_pending()
    f.device = SimpleNamespace(type="cpu")
    f.slots.layout_version = 3
    assert not f.warm_pending()
    f.warm_up()  # returns without warming


def test_a_last_slice_with_nothing_left_to_launch_still_logs_the_finished_warm_up(monkeypatch):
    """Slice 1 launches and stops at its deadline; slice 2 finds every variant seen: the log's last word on the
    warm-up is `finished`, not slice 1's unfinished one."""
    logs = []

    class Recorder:  # the module's logger (structlog caches bound loggers once configured: capture_logs misses them)
        def info(self, event, **fields):
            logs.append(dict(fields, event=event))

        exception = warning = info

    results = iter([sbmm_warmup.Warmed(2, False), sbmm_warmup.Warmed(0, True)])
    monkeypatch.setattr(sbmm_warmup, "warm_up_stacks", lambda *a, **k: next(results))
    monkeypatch.setattr(tp_follower, "log", Recorder())
    f = make_follower(FakeConn([None, None, None]))
    f.run()
    warmed = [e for e in logs if e["event"] == "sbmm_warmed_up"]
    assert [(e["launches"], e["finished"]) for e in warmed] == [(2, False), (0, True)]
    assert f.warmed_version == 1
