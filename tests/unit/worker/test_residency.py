"""ResidencyManager: LRU order, byte accounting, pins and tier transitions, with a fake TierIO."""

import threading

import pytest

from services.worker.residency import DeltaState, ResidencyLimits, ResidencyManager, Tier

SIZES = {"a": 100, "b": 200, "c": 300, "d": 400}


class FakeIO:
    def __init__(self, fail: set[str] | None = None, gate: threading.Event | None = None):
        self.calls: list[tuple] = []
        self.fail = fail or set()
        self.gate = gate

    def fetch(self, name):
        self.calls.append(("fetch", name))
        if self.gate is not None:
            self.gate.wait(5)
        if name in self.fail:
            raise FileNotFoundError(f"{name} not in any store")
        return f"/cache/{name}", SIZES[name]

    def load_host(self, name, path):
        self.calls.append(("host", name))
        return {"name": name}, SIZES[name]

    def host_bytes_estimate(self, name, path, disk_bytes):
        return SIZES[name]

    def to_device(self, name, host, slot):
        self.calls.append(("device", name, slot))
        return SIZES[name]

    def drop_device(self, name, slot):
        self.calls.append(("drop_device", name, slot))

    def drop_disk(self, name, path):
        self.calls.append(("drop_disk", name))


def make(slots=2, device=0, host=10_000, disk=10_000, io=None):
    events = []
    io = io or FakeIO()
    mgr = ResidencyManager(ResidencyLimits(slots, device, host, disk), io, on_change=events.append)
    return mgr, io, events


def load(mgr, name, tier=Tier.DEVICE):
    return mgr.ensure(name, tier).result(timeout=5)


def test_ensure_walks_every_tier_and_publishes_each_transition():
    mgr, io, events = make()
    snap = load(mgr, "a")
    assert snap.state is DeltaState.ON_DEVICE and snap.slot == 0 and snap.bytes == 100
    assert mgr.is_ready("a") and mgr.slot_of("a") == 0
    assert [e.state for e in events] == [DeltaState.FETCHING, DeltaState.ON_DISK, DeltaState.IN_HOST,
                                         DeltaState.LOADING, DeltaState.ON_DEVICE]
    assert [c[0] for c in io.calls] == ["fetch", "host", "device"]
    assert load(mgr, "a").slot == 0 and len(io.calls) == 3  # already there: no work
    mgr.close()


def test_ensure_host_stops_at_host():
    mgr, io, _ = make()
    assert load(mgr, "b", Tier.HOST).state is DeltaState.IN_HOST
    assert not mgr.is_ready("b") and mgr.used_bytes(Tier.HOST) == 200
    mgr.close()


def test_device_slots_evict_least_recently_used():
    mgr, io, _ = make(slots=2)
    load(mgr, "a")
    load(mgr, "b")
    mgr.touch("a")  # b is now the least recently used
    snap = load(mgr, "c")
    assert snap.slot == 1  # b's slot
    assert mgr.state_of("b") is DeltaState.IN_HOST and mgr.is_ready("a")
    assert ("drop_device", "b", 1) in io.calls
    mgr.close()


def test_pinned_delta_is_never_evicted_and_waiter_gets_slot_on_unpin():
    mgr, io, _ = make(slots=1)
    load(mgr, "a")
    mgr.pin("a")
    future = mgr.ensure("b")
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    assert mgr.state_of("b") is DeltaState.IN_HOST and mgr.is_ready("a")
    assert not mgr.evict("a")
    mgr.unpin("a")
    assert future.result(timeout=5).slot == 0
    assert mgr.state_of("a") is DeltaState.IN_HOST
    mgr.close()


def test_host_byte_accounting_evicts_lru_but_not_device_resident():
    mgr, io, _ = make(slots=1, host=550)
    load(mgr, "a")                  # device+host: 100
    load(mgr, "b", Tier.HOST)       # host 300
    load(mgr, "c", Tier.HOST)       # host 600 > 550: evict b (a is on device)
    assert mgr.state_of("b") is DeltaState.ON_DISK
    assert mgr.state_of("a") is DeltaState.ON_DEVICE
    assert mgr.used_bytes(Tier.HOST) == 400
    mgr.close()


def test_host_load_waits_for_room_while_the_host_tier_is_pinned():
    """A load starts only when the host budget holds it: with the budget pinned by live requests it waits (nothing
    loaded past the budget), and starts once a pin is released, evicting the unpinned entry."""
    mgr, io, _ = make(slots=1, host=400)
    mgr.pin("c")
    load(mgr, "c", Tier.HOST)  # 300 of 400, pinned
    future = mgr.ensure("b", Tier.HOST)  # 200 more would pass the budget
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    assert ("host", "b") not in io.calls and mgr.state_of("b") is DeltaState.ON_DISK
    assert mgr.used_bytes(Tier.HOST) == 300
    mgr.unpin("c")
    assert future.result(timeout=5).state is DeltaState.IN_HOST
    assert mgr.state_of("c") is DeltaState.ON_DISK and mgr.used_bytes(Tier.HOST) == 200
    mgr.close()


def test_a_load_that_cannot_fit_evicts_nothing_while_it_waits():
    """Evicting the unpinned entry would not make room next to the pinned one: it stays in host until it would."""
    mgr, io, _ = make(slots=1, host=400)
    load(mgr, "a", Tier.HOST)  # 100, unpinned
    mgr.pin("c")
    load(mgr, "c", Tier.HOST)  # 300, pinned: 400 of 400
    future = mgr.ensure("b", Tier.HOST)  # 200: 300 pinned + 200 > 400 even without a
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    assert mgr.state_of("a") is DeltaState.IN_HOST and mgr.used_bytes(Tier.HOST) == 400
    mgr.unpin("c")
    assert future.result(timeout=5).state is DeltaState.IN_HOST
    assert mgr.used_bytes(Tier.HOST) <= 400
    mgr.close()


def test_a_model_larger_than_the_host_budget_still_loads_alone():
    """A budget smaller than one model must not stall requests: one load may exceed it when nothing else is in host;
    a second one waits until the first is unpinned, then replaces it."""
    mgr, io, _ = make(slots=1, host=50)
    mgr.pin("a")
    assert load(mgr, "a", Tier.HOST).state is DeltaState.IN_HOST  # 100 > 50, alone
    future = mgr.ensure("b", Tier.HOST)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    mgr.unpin("a")
    assert future.result(timeout=5).state is DeltaState.IN_HOST
    assert mgr.state_of("a") is DeltaState.ON_DISK and mgr.used_bytes(Tier.HOST) == 200
    mgr.close()


def test_queued_host_loads_go_first_come_first_served_requests_before_prefetches():
    """Three loads queued behind a pinned host tier: the one a request pins goes before an earlier prefetch (one
    loader thread, so the order they start in is the order they run in)."""
    io = FakeIO()
    mgr = ResidencyManager(ResidencyLimits(1, 0, 300, 10_000), io, max_workers=1)
    load(mgr, "a", Tier.DISK)
    load(mgr, "b", Tier.DISK)
    mgr.pin("c")
    load(mgr, "c", Tier.HOST)  # 300 of 300, pinned
    prefetch = mgr.ensure("a", Tier.HOST)
    mgr.pin("b")
    wanted = mgr.ensure("b", Tier.HOST)
    mgr.unpin("c")
    assert wanted.result(timeout=5).state is DeltaState.IN_HOST
    assert prefetch.result(timeout=5).state is DeltaState.IN_HOST  # 200 + 100 fit together
    hosts = [c[1] for c in io.calls if c[0] == "host"]
    assert hosts == ["c", "b", "a"]
    mgr.close()


def test_disk_byte_accounting_drops_files():
    mgr, io, _ = make(disk=500)
    load(mgr, "b", Tier.DISK)
    load(mgr, "c", Tier.DISK)  # 500: fits
    load(mgr, "a", Tier.DISK)  # 600: evicts b
    assert mgr.state_of("b") is DeltaState.REMOTE and ("drop_disk", "b") in io.calls
    assert mgr.used_bytes(Tier.DISK) == 400
    mgr.close()


def test_device_byte_budget():
    mgr, io, _ = make(slots=4, device=500)
    load(mgr, "a")
    load(mgr, "c")
    load(mgr, "b")  # 600 > 500: evicts a
    assert mgr.state_of("a") is DeltaState.IN_HOST and mgr.used_bytes(Tier.DEVICE) == 500
    mgr.close()


def test_explicit_evict_down_tiers():
    mgr, io, events = make()
    load(mgr, "a")
    assert mgr.evict("a", Tier.DEVICE) and mgr.state_of("a") is DeltaState.IN_HOST
    assert not mgr.evict("a", Tier.DEVICE)  # not on device any more
    load(mgr, "a")
    assert mgr.evict("a", Tier.DISK) and mgr.state_of("a") is DeltaState.REMOTE
    assert [mgr.used_bytes(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK)] == [0, 0, 0]
    assert mgr.snapshot() == []
    mgr.close()


def test_failure_reaches_waiters_and_retry_is_possible():
    io = FakeIO(fail={"d"})
    mgr, _, _ = make(io=io)
    with pytest.raises(FileNotFoundError):
        load(mgr, "d")
    assert mgr.state_of("d") is DeltaState.FAILED
    io.fail.clear()
    assert load(mgr, "d").state is DeltaState.ON_DEVICE
    mgr.close()


def test_concurrent_ensures_share_one_fetch():
    gate = threading.Event()
    mgr, io, _ = make(io=FakeIO(gate=gate))
    futures = [mgr.ensure("a") for _ in range(5)]
    gate.set()
    assert {f.result(timeout=5).slot for f in futures} == {0}
    assert [c[0] for c in io.calls].count("fetch") == 1
    mgr.close()


def test_snapshot_lists_tiers_fastest_first():
    mgr, _, _ = make()
    load(mgr, "b", Tier.DISK)
    load(mgr, "a")
    rows = mgr.snapshot()
    assert [(r.name, r.tier) for r in rows] == [("a", Tier.DEVICE), ("b", Tier.DISK)]
    mgr.close()


def test_hot_deltas_beyond_slots_take_turns_by_draining():
    mgr, io, _ = make(slots=1)
    load(mgr, "a")
    mgr.pin("a")  # a request of a still waits (or runs)
    mgr.pin("b")
    future = mgr.ensure("b")
    assert wait_for(lambda: not mgr.is_ready("a"))  # a is draining: no new sequences of a
    assert mgr.state_of("a") is DeltaState.ON_DEVICE and mgr.slot_of("a") == 0
    mgr.on_step(1, frozenset({"a"}))  # the step that may have admitted a's sequence
    mgr.on_step(2, frozenset({"a"}))  # a still runs: its slot stays
    assert mgr.state_of("a") is DeltaState.ON_DEVICE and not future.done()
    mgr.on_step(3, frozenset())  # a's sequences are done running: slot goes to b, a queues again
    assert future.result(timeout=5).slot == 0
    assert mgr.state_of("a") is DeltaState.IN_HOST
    mgr.unpin("b")  # b's request finished: a gets the slot back
    assert wait_for(lambda: mgr.is_ready("a"))
    mgr.unpin("a")
    mgr.close()


def test_prefetch_without_requests_does_not_drain():
    mgr, io, _ = make(slots=1)
    load(mgr, "a")
    mgr.pin("a")
    future = mgr.ensure("b")  # LoadDelta/prefetch: nobody waits on b
    mgr.on_step(1, frozenset())
    mgr.on_step(2, frozenset())
    assert mgr.is_ready("a") and not future.done()
    mgr.unpin("a")
    assert future.result(timeout=5).slot == 0
    mgr.close()


def wait_for(cond, timeout_s=2.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_requested_delta_gets_a_freed_slot_before_a_prefetch():
    mgr, io, _ = make(slots=1)
    load(mgr, "a")
    mgr.pin("a")
    prefetch = mgr.ensure("b")  # queued first, nobody waits on it
    mgr.pin("c")
    wanted = mgr.ensure("c")
    assert wait_for(lambda: mgr.state_of("c") is DeltaState.IN_HOST and mgr.state_of("b") is DeltaState.IN_HOST)
    mgr.unpin("a")
    assert wanted.result(timeout=5).slot == 0 and not prefetch.done()
    mgr.unpin("c")
    assert prefetch.result(timeout=5).slot == 0
    mgr.close()


class SlowFetchIO(FakeIO):
    """Fetches of the names in `slow` block until `release` is set; the others return at once."""

    def __init__(self, slow: set[str]):
        super().__init__()
        self.slow, self.release = slow, threading.Event()

    def fetch(self, name):
        if name in self.slow:
            self.release.wait(10)
        return super().fetch(name)


def test_an_arrived_delta_goes_to_the_device_while_other_fetches_are_queued():
    """Fetches and loads use separate pools: with every fetch thread busy on slow downloads and more queued, a
    delta whose fetch is done still reaches its device slot (one FIFO pool made it wait behind all of them)."""
    io = SlowFetchIO(slow={"b", "c", "d"})
    mgr = ResidencyManager(ResidencyLimits(4, 0, 10_000, 10_000), io, max_workers=1)
    try:
        a = mgr.ensure("a")
        while ("fetch", "a") not in io.calls:  # a's fetch has run; b's now holds the only fetch thread
            threading.Event().wait(0.01)
        slow = [mgr.ensure(n) for n in ("b", "c", "d")]
        assert a.result(timeout=5).state is DeltaState.ON_DEVICE
        assert not any(f.done() for f in slow)
    finally:
        io.release.set()
    assert all(f.result(timeout=5).state is DeltaState.ON_DEVICE for f in slow)
    mgr.close()
