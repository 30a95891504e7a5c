"""TextStream: token ids -> text deltas, holding back text that may be the start of a stop sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of ids into text pieces; waits while a UTF-8 character is incomplete."""

    def __init__(self, decode: Callable[[list[int]], str], context: int = 6) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # ids before this only give context for spacing
        self._read = 0  # text of ids[prefix:read] has been emitted
        self._context = context

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ids and return the new complete text (may be '')."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""
        new_text = full_text[len(prefix_text):]
        self._read = len(self._ids)
        self._prefix = max(self._prefix, self._read - self._context)
        return new_text


@dataclass(slots=True)
class TextDelta:
    text: str
    stopped: bool  # a stop sequence was reached; text ends right before it


class StopMatcher:
    """Emits text up to the first stop sequence; holds back a tail that might still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str, final: bool = False, check_stops: bool = True) -> TextDelta:
        assert not self.stopped, "feed after a stop sequence"
        self._pending += text
        if not check_stops:  # before min_tokens: stops do not count, nothing is held back
            out, self._pending = self._pending, ""
            return TextDelta(out, False)
        hits = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return TextDelta(out, True)
        keep = 0 if final else self._held_tail()
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return TextDelta(out, False)

    def _held_tail(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Detokenizer + stop matcher for one request."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(decode)
        self._stops = StopMatcher(stops)

    def add(self, token_ids: Sequence[int], final: bool = False, check_stops: bool = True) -> TextDelta:
        return self._stops.feed(self._detok.add(token_ids), final=final, check_stops=check_stops)
