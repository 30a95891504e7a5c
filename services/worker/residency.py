"""ResidencyManager: where each delta lives on this worker (device slot ⊂ host cache ⊂ disk cache ⊂ store).

One owner for delta slots. LRU per tier with byte accounting; a delta pinned by a live request is never
evicted; every state transition is reported to `on_change` (the publisher mirrors it into Redis).
A host load starts only when the host budget has room for it (`TierIO.host_bytes_estimate`, evicting unpinned
entries first); otherwise it waits in a FCFS queue until pins are released. Without that, a burst for many fine-tunes
pinned them all and loaded every one past the budget: swap mode's 7 GB merged models (16-layer 7B) took a 128 GB host
to 125 GB in one run and the worker died.
The slow work runs in two small thread pools through `TierIO`: fetches from the store in one, host loads and device
copies in the other, so a delta that has arrived goes on to the GPU while fetches of others are still queued (one
FIFO pool made it wait behind every fetch queued before it: with 64 cold fine-tunes requested at once, no delta
reached the GPU for the first ~40 s of a 4-GPU scale-out run).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from deltazip import metrics
from services.worker.residency_state import (
    TIER_OF_STATE,
    ChangeCallback,
    DeltaEntry,
    DeltaState,
    ResidencyLimits,
    ResidentDelta,
    Tier,
    TierIO,
    snapshot_of,
)

__all__ = ["ResidencyManager", "ResidencyLimits", "DeltaState", "ResidentDelta", "Tier", "TierIO", "TIER_OF_STATE"]


class ResidencyManager:
    """Moves deltas between tiers on demand; `ensure(name, tier)` returns a Future done when it is there."""

    def __init__(self, limits: ResidencyLimits, io: TierIO, on_change: ChangeCallback | None = None,
                 max_workers: int = 4) -> None:
        self._limits = limits
        self._io = io
        self._on_change = on_change or (lambda _: None)
        self._lock = threading.RLock()
        self._entries: dict[str, DeltaEntry] = {}
        self._lru = {tier: OrderedDict() for tier in (Tier.DEVICE, Tier.HOST, Tier.DISK)}  # name -> bytes
        self._free_slots = list(range(limits.num_device_slots))
        self._waiters: dict[str, list[tuple[Tier, Future]]] = {}
        self._device_queue: OrderedDict[str, None] = OrderedDict()  # FCFS waiting for a slot
        self._host_queue: OrderedDict[str, int | None] = OrderedDict()  # FCFS on disk, waiting for host budget ->
        # its host bytes estimate, computed once (a manifest read in dense-delta mode; admission runs every step)
        self._host_loading: dict[str, int] = {}  # name -> estimated host bytes of a load in flight
        self._step = 0  # last engine step reported through on_step
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="residency")  # host, device
        self._fetch_pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="residency-fetch")
        self._closed = False

    # ---- queries -------------------------------------------------------------------------------
    def is_ready(self, name: str) -> bool:
        """True when the delta sits in a device slot and may start new sequences (not draining)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.state is DeltaState.ON_DEVICE and entry.draining_since is None

    def host_tensors(self, name: str) -> dict | None:
        """The host-tier copy of a delta that is ready on the device tier (swap mode: merged weights)."""
        with self._lock:
            entry = self._entries.get(name)
            ready = entry is not None and entry.state is DeltaState.ON_DEVICE and entry.draining_since is None
            return entry.host if ready else None

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.slot if entry is not None and entry.state is DeltaState.ON_DEVICE else None

    def state_of(self, name: str) -> DeltaState:
        with self._lock:
            entry = self._entries.get(name)
            return entry.state if entry else DeltaState.REMOTE

    def load_ms(self, name: str) -> float:
        with self._lock:
            entry = self._entries.get(name)
            return entry.load_ms if entry else 0.0

    def entry(self, name: str) -> ResidentDelta | None:
        with self._lock:
            entry = self._entries.get(name)
            return snapshot_of(entry) if entry else None

    def snapshot(self) -> list[ResidentDelta]:
        """Every delta held in some local tier, fastest tier first."""
        with self._lock:
            rows = [snapshot_of(e) for e in self._entries.values() if e.tier is not Tier.REMOTE]
        return sorted(rows, key=lambda r: (r.tier, r.name))

    def lru_names(self, tier: Tier) -> list[str]:
        """Deltas held in `tier` (tiers are inclusive), least recently used first."""
        with self._lock:
            return list(self._lru[tier])

    def used_bytes(self, tier: Tier) -> int:
        with self._lock:
            return sum(self._lru[tier].values())

    # ---- pins (one per live request) -----------------------------------------------------------
    def pin(self, name: str) -> None:
        """A live request uses `name`: never evict it until unpinned."""
        with self._lock:
            entry = self._entry(name)
            entry.pins += 1
            self._touch(entry)

    def unpin(self, name: str) -> None:
        with self._lock:
            entry = self._entries[name]
            assert entry.pins > 0, f"unpin of {name} without pin"
            entry.pins -= 1
            if entry.pins == 0:
                self._admit_device_waiters()
                self._admit_host_loads()

    def on_step(self, step: int, running: frozenset[str]) -> None:
        """Engine thread, between steps: free the slots of draining deltas that no longer run.

        A delta marked draining before step `d` started admits no sequence from step d + 1 on, so once a
        step after d reports it not running, nothing will touch its slot: it goes back to host and, if
        requests still wait for it, to the end of the device queue (round robin when hot deltas > slots).
        """
        with self._lock:
            self._step = step
            for entry in [e for e in self._entries.values() if e.draining_since is not None]:
                if step > entry.draining_since and entry.name not in running and entry.state is DeltaState.ON_DEVICE:
                    self._evict_to_below(entry, Tier.DEVICE)
                    if entry.pins:
                        self._device_queue[entry.name] = None
            self._admit_device_waiters()
            self._admit_host_loads()

    def touch(self, name: str) -> None:
        """Mark `name` as just used (most recent in every LRU it is in)."""
        with self._lock:
            if name in self._entries:
                self._touch(self._entries[name])

    # ---- moves ---------------------------------------------------------------------------------
    def register_on_disk(self, name: str, path: str, num_bytes: int) -> None:
        """A complete artifact found in the disk cache at startup."""
        with self._lock:
            entry = self._entry(name)
            if entry.state is DeltaState.REMOTE:
                entry.path, entry.disk_bytes = path, num_bytes
                self._lru[Tier.DISK][name] = num_bytes
                self._set_state(entry, DeltaState.ON_DISK)

    def ensure(self, name: str, tier: Tier = Tier.DEVICE) -> Future:
        """Future resolved (with the delta's ResidentDelta) once `name` is in `tier` or faster."""
        future: Future = Future()
        with self._lock:
            assert not self._closed, "residency manager is closed"
            entry = self._entry(name)
            self._touch(entry)
            metrics.RESIDENCY_LOOKUPS.labels(tier.name.lower(), "hit" if entry.tier <= tier else "miss").inc()
            if entry.tier <= tier and entry.state is not DeltaState.LOADING:
                future.set_result(snapshot_of(entry))
                return future
            self._waiters.setdefault(name, []).append((tier, future))
            if entry.state is DeltaState.FAILED:
                entry.error = None
                self._set_state(entry, DeltaState.ON_DISK if entry.path else DeltaState.REMOTE)
            self._advance(entry)
        return future

    def evict(self, name: str, tier: Tier = Tier.DEVICE) -> bool:
        """Drop `name` from `tier` and every faster one; False when pinned, busy or not there."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.pins or entry.busy or entry.tier > tier or entry.name in self._waiters:
                return False
            self._evict_to_below(entry, tier)
            self._admit_device_waiters()
            self._admit_host_loads()
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._fetch_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- internals (hold self._lock) -----------------------------------------------------------
    def _entry(self, name: str) -> DeltaEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = DeltaEntry(name)
        return entry

    def _touch(self, entry: DeltaEntry) -> None:
        for lru in self._lru.values():
            if entry.name in lru:
                lru.move_to_end(entry.name)

    def _set_state(self, entry: DeltaEntry, state: DeltaState) -> None:
        entry.state = state
        self._on_change(snapshot_of(entry))

    def _advance(self, entry: DeltaEntry) -> None:
        """Start the next move toward the fastest tier any waiter asked for, or resolve waiters."""
        if entry.busy:
            return
        waiters = self._waiters.get(entry.name, [])
        if not waiters:
            return
        want = min(t for t, _ in waiters)
        if entry.tier <= want and entry.state is not DeltaState.LOADING:
            self._resolve(entry)
        elif entry.state is DeltaState.REMOTE:
            self._run(entry, DeltaState.FETCHING, self._do_fetch)
        elif entry.state is DeltaState.ON_DISK:
            self._host_queue.setdefault(entry.name, None)
            self._admit_host_loads()
        elif entry.state is DeltaState.IN_HOST and entry.name not in self._device_queue:
            self._device_queue[entry.name] = None
            self._admit_device_waiters()

    def _resolve(self, entry: DeltaEntry) -> None:
        done = [f for t, f in self._waiters.get(entry.name, []) if entry.tier <= t]
        self._waiters[entry.name] = [(t, f) for t, f in self._waiters.get(entry.name, []) if entry.tier > t]
        if not self._waiters[entry.name]:
            del self._waiters[entry.name]
        snap = snapshot_of(entry)
        for f in done:
            if not f.done():
                f.set_result(snap)

    def _fail(self, entry: DeltaEntry, exc: BaseException) -> None:
        entry.error = exc
        self._device_queue.pop(entry.name, None)
        self._host_queue.pop(entry.name, None)
        self._host_loading.pop(entry.name, None)
        entry.host, entry.host_bytes = None, 0
        self._lru[Tier.HOST].pop(entry.name, None)
        self._set_state(entry, DeltaState.FAILED)
        for _, f in self._waiters.pop(entry.name, []):
            if not f.done():
                f.set_exception(exc)

    def _run(self, entry: DeltaEntry, state: DeltaState | None, work: Callable[[DeltaEntry], None]) -> None:
        entry.busy = True
        if state is not None:
            self._set_state(entry, state)
        pool = self._fetch_pool if work == self._do_fetch else self._pool
        pool.submit(self._guarded, entry, work)

    def _guarded(self, entry: DeltaEntry, work: Callable[[DeltaEntry], None]) -> None:
        try:
            work(entry)
        except Exception as exc:  # reported to every waiter of this delta as the request's error
            with self._lock:
                entry.busy = False
                if entry.slot is not None:
                    self._release_slot(entry)
                self._fail(entry, exc)
                self._admit_device_waiters()
                self._admit_host_loads()
            return
        with self._lock:
            entry.busy = False
            self._advance(entry)
            self._admit_host_loads()

    def _do_fetch(self, entry: DeltaEntry) -> None:
        start = time.perf_counter()
        path, num_bytes = self._io.fetch(entry.name)
        metrics.observe_transfer("fetch", num_bytes, time.perf_counter() - start)
        with self._lock:
            entry.path, entry.disk_bytes = path, num_bytes
            self._lru[Tier.DISK][entry.name] = num_bytes
            self._make_room(Tier.DISK, self._limits.disk_bytes, keep=entry.name)
            self._set_state(entry, DeltaState.ON_DISK)

    def _do_load_host(self, entry: DeltaEntry) -> None:
        start = time.perf_counter()
        host, num_bytes = self._io.load_host(entry.name, entry.path)
        metrics.observe_transfer("host_load", num_bytes, time.perf_counter() - start)
        with self._lock:
            self._host_loading.pop(entry.name, None)
            entry.host, entry.host_bytes = host, num_bytes
            self._lru[Tier.HOST][entry.name] = num_bytes
            self._make_room(Tier.HOST, self._limits.host_bytes, keep=entry.name)  # if the estimate was low
            self._set_state(entry, DeltaState.IN_HOST)

    def _do_to_device(self, entry: DeltaEntry) -> None:
        start = time.perf_counter()
        num_bytes = self._io.to_device(entry.name, entry.host, entry.slot)
        with self._lock:
            entry.device_bytes = num_bytes
            entry.load_ms = (time.perf_counter() - start) * 1e3
            metrics.observe_transfer("device_load", num_bytes, entry.load_ms / 1e3)
            self._lru[Tier.DEVICE][entry.name] = num_bytes
            self._set_state(entry, DeltaState.ON_DEVICE)

    def _admit_device_waiters(self) -> None:
        """Give free (or freeable) slots to deltas waiting in host: those live requests wait for first, each
        group first come first served (a prefetch never takes a slot a request is waiting for)."""
        for name in sorted(self._device_queue, key=lambda n: self._entries[n].pins == 0):
            entry = self._entries[name]
            if entry.state is not DeltaState.IN_HOST:
                self._device_queue.pop(name)
                continue
            if not self._claim_slot(entry):
                self._drain_for_waiters()
                return  # FCFS: later deltas wait behind the first one that cannot fit
            self._device_queue.pop(name)
            self._run(entry, DeltaState.LOADING, self._do_to_device)

    def _admit_host_loads(self) -> None:
        """Start the queued host loads the host budget has room for: those live requests wait for first, each group
        first come first served. Room is made by evicting unpinned entries; pinned ones are waited for (their
        requests finish and unpin them). One load may exceed the budget alone, when nothing else is in host or
        loading: a budget smaller than one model must not stall every request."""
        for name in sorted(self._host_queue, key=lambda n: self._entries[n].pins == 0):
            entry = self._entries[name]
            if entry.state is not DeltaState.ON_DISK or entry.busy or name not in self._waiters:
                self._host_queue.pop(name)
                continue
            need = self._host_queue[name]
            if need is None:
                need = self._host_queue[name] = self._io.host_bytes_estimate(name, entry.path, entry.disk_bytes)
            if not self._host_room(need, keep=name):
                return  # FCFS: later loads wait behind the first one that cannot fit
            self._host_queue.pop(name)
            self._host_loading[name] = need
            self._run(entry, None, self._do_load_host)

    def _host_room(self, need: int, keep: str) -> bool:
        """Evict unpinned host entries (LRU) until `need` more bytes fit the host budget; False, evicting nothing, if
        even evicting all of them would not make room (unless nothing would be left: a load alone may pass it)."""
        loading = sum(self._host_loading.values())
        held = self.used_bytes(Tier.HOST) + loading
        if held + need <= self._limits.host_bytes:
            return True
        kept = held - sum(self._lru[Tier.HOST][e.name] for e in self._evictable(Tier.HOST, keep))
        if kept > 0 and kept + need > self._limits.host_bytes:
            return False
        while self.used_bytes(Tier.HOST) + loading + need > self._limits.host_bytes:
            victim = self._lru_victim(Tier.HOST, keep)
            if victim is None:
                break  # nothing is left but this load
            self._evict_to_below(victim, Tier.HOST)
        return True

    def _claim_slot(self, entry: DeltaEntry) -> bool:
        need = entry.host_bytes if self._limits.device_bytes else 0
        while not self._free_slots or (need and self.used_bytes(Tier.DEVICE) + need > self._limits.device_bytes):
            victim = self._lru_victim(Tier.DEVICE, keep=entry.name)
            if victim is None:
                return False
            self._evict_to_below(victim, Tier.DEVICE)
        entry.slot = self._free_slots.pop(0)
        return True

    def _drain_for_waiters(self) -> None:
        """Every slot is pinned: stop the least recently used pinned delta from taking new sequences."""
        draining = sum(e.draining_since is not None for e in self._entries.values())
        waiting = sum(self._entries[n].pins > 0 for n in self._device_queue)
        if draining >= waiting:
            return
        for name in self._lru[Tier.DEVICE]:
            e = self._entries[name]
            if e.state is DeltaState.ON_DEVICE and e.draining_since is None and not e.busy:
                e.draining_since = self._step
                self._on_change(snapshot_of(e))
                return

    def _lru_victim(self, tier: Tier, keep: str) -> DeltaEntry | None:
        """Least recently used evictable entry of `tier`, preferring ones not also held in a faster tier."""
        candidates = self._evictable(tier, keep)
        for e in candidates:
            if e.tier == tier:
                return e
        return candidates[0] if candidates else None

    def _evictable(self, tier: Tier, keep: str) -> list[DeltaEntry]:
        """Entries held in `tier` that may be evicted now (LRU first): not `keep`, pinned, busy or waited for."""
        entries = [self._entries[n] for n in self._lru[tier] if n != keep]
        return [e for e in entries if not e.pins and not e.busy and e.name not in self._waiters]

    def _make_room(self, tier: Tier, limit: int, keep: str) -> None:
        while sum(self._lru[tier].values()) > limit:
            victim = self._lru_victim(tier, keep)
            if victim is None:
                return  # everything else is in use: run over budget rather than fail a request
            self._evict_to_below(victim, tier)

    def _release_slot(self, entry: DeltaEntry) -> None:
        self._io.drop_device(entry.name, entry.slot)
        self._free_slots.append(entry.slot)
        self._free_slots.sort()
        entry.slot, entry.device_bytes, entry.draining_since = None, 0, None
        self._lru[Tier.DEVICE].pop(entry.name, None)

    def _evict_to_below(self, entry: DeltaEntry, tier: Tier) -> None:
        """Drop entry from `tier` and every faster tier (tiers are inclusive)."""
        if entry.state is DeltaState.ON_DEVICE:
            self._release_slot(entry)
            self._set_state(entry, DeltaState.IN_HOST)
        if tier >= Tier.HOST and entry.state is DeltaState.IN_HOST:
            entry.host, entry.host_bytes = None, 0
            self._lru[Tier.HOST].pop(entry.name, None)
            self._device_queue.pop(entry.name, None)
            self._set_state(entry, DeltaState.ON_DISK)
        if tier >= Tier.DISK and entry.state is DeltaState.ON_DISK:
            self._io.drop_disk(entry.name, entry.path)
            entry.path, entry.disk_bytes = "", 0
            self._lru[Tier.DISK].pop(entry.name, None)
            self._set_state(entry, DeltaState.REMOTE)
