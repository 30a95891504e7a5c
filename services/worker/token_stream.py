"""From engine steps to stream chunks: one event-loop wakeup per batch of deliveries, several tokens per chunk.

Every token used to cost one `call_soon_threadsafe` (a self-pipe write), one asyncio task wakeup and one gRPC
message on each hop (worker → scheduler → client), and that per-message work, not the engine, capped the stack.
Here the engine thread's deliveries of a step share one wakeup (`Mailbox`), and a request's stream (`Chunker`)
sends its first token at once, then gathers tokens into chunks of `chunk_tokens`, sending early when the request
finishes or when a held token has waited `interval_ms`. The chunk size is a count, not a timing: a relay that
falls behind does not make chunks smaller and itself slower still.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from services.worker.engine_loop import Sink, TokenEvent


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """How a request's tokens are grouped into chunks."""

    chunk_tokens: int = 8  # send once this many tokens are held; 1 = one chunk per token (the old relay)
    interval_ms: float = 50.0  # longest a token is held for the chunk to fill

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"--stream-chunk-tokens must be >= 1, got {self.chunk_tokens}")
        if not 0.0 <= self.interval_ms <= 1000.0:
            raise ValueError(f"--stream-interval-ms must be in [0, 1000], got {self.interval_ms}")


class Mailbox:
    """Engine thread → one asyncio loop: deliveries made while a drain is pending ride on the same wakeup."""

    def __init__(self, aio_loop: asyncio.AbstractEventLoop) -> None:
        self.aio_loop = aio_loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, TokenEvent]] = []
        self._scheduled = False

    def sink(self, events: asyncio.Queue) -> Sink:
        """A thread-safe sink that puts one request's events on `events`."""

        def deliver(event: TokenEvent) -> None:
            with self._lock:
                self._items.append((events, event))
                if self._scheduled:
                    return
                self._scheduled = True
            try:
                self.aio_loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the listening event loop is closed: nobody is listening any more
                pass

        return deliver

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for events, event in items:
            events.put_nowait(event)


# Put on a request's queue when its held tokens have waited long enough; carries nothing, so merging it is a no-op.
FLUSH = TokenEvent([], "", False, None, 0.0)


class Chunker:
    """One request's held tokens: `add` the events that arrived, `ready()` says whether to send them now."""

    def __init__(self, policy: StreamPolicy, events: asyncio.Queue) -> None:
        self.policy = policy
        self.events = events
        self.held: list[TokenEvent] = []
        self.num_held = 0  # tokens
        self.num_sent = 0  # tokens
        self._flush_due = False  # the hold timer fired
        self._timer: asyncio.TimerHandle | None = None

    def add(self, event: TokenEvent) -> None:
        """`event` and every event already waiting behind it (up to a finished one)."""
        flush = event is FLUSH
        self.held.append(event)
        self.num_held += len(event.token_ids)
        while not self.held[-1].finished and not self.events.empty():
            event = self.events.get_nowait()
            flush |= event is FLUSH
            self.held.append(event)
            self.num_held += len(event.token_ids)
        self._flush_due = flush

    def ready(self) -> bool:
        """Send now: finished, first tokens, a full chunk, or held long enough; else arm the hold timer once."""
        if not self.num_held and not self.held[-1].finished:
            return False  # only FLUSH or empty events: nothing to send
        if (self.held[-1].finished or self._flush_due or not self.num_sent
                or self.num_held >= self.policy.chunk_tokens or not self.policy.interval_ms):
            return True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.policy.interval_ms / 1e3,
                                                                self.events.put_nowait, FLUSH)
        return False

    def take(self) -> list[TokenEvent]:
        """The held events, now sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self.held = self.held, []
        self.num_sent += self.num_held
        self.num_held = 0
        return held

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
