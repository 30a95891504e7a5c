"""TextStream: incremental detokenization and stop sequences."""

from services.worker.text_stream import IncrementalDetokenizer, StopMatcher, TextStream

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: b"\xe2\x82".decode("latin-1"), 7: "END"}


def decode(ids):
    # bytes-level toy: ids 8/9 together make "€" (UTF-8 e2 82 ac)
    raw = b"".join({8: b"\xe2\x82", 9: b"\xac"}.get(i, VOCAB.get(i, "").encode()) for i in ids)
    return raw.decode("utf-8", errors="replace")


def test_detokenizer_emits_pieces_and_waits_for_complete_chars():
    d = IncrementalDetokenizer(decode)
    assert [d.add([i]) for i in (1, 2, 3, 4)] == ["Hel", "lo", " wor", "ld"]
    assert d.add([8]) == ""
    assert d.add([9]) == "€"


def test_stop_sequence_is_cut_and_not_emitted():
    s = TextStream(decode, ["ld!"])
    out = [s.add([i]) for i in (1, 2, 3, 4)]
    assert "".join(o.text for o in out) == "Hello wor"  # "ld" held back: may start "ld!"
    last = s.add([5])
    assert last.stopped and last.text == ""


def test_held_text_is_released_when_it_cannot_be_a_stop():
    m = StopMatcher(["END"])
    assert m.feed("abE").text == "ab"
    assert m.feed("x").text == "Ex"
    assert m.feed("EN", final=True).text == "EN"


def test_stop_in_middle_of_piece():
    m = StopMatcher(["\n\n", "STOP"])
    d = m.feed("hi STOP there")
    assert d.stopped and d.text == "hi "
