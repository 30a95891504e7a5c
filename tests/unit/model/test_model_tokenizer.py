"""Tokenizer wrapper, streaming detokenization and stop sequences."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltazip.convert.base import default_base_dir
from deltazip.model.tokenizer import IncrementalDecoder, StopChecker, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(default_base_dir())


def test_chat_template_renders_like_hf(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant") and text.endswith("Hi<|im_end|>\n")


@pytest.mark.parametrize(
    "text", ["naïve café ☕ and 日本語 with 🤖🚀 emoji", "plain ascii, numbers 12345.", "ß∂ƒ©˙∆˚¬…æ"]
)
def test_incremental_decoder_streams_whole_characters(tok, text):
    ids = tok.encode(text)
    dec = tok.incremental_decoder(prompt_ids=tok.encode("Say: "))
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    if "🤖" in text:  # multi-token character: some step must have held its bytes back
        assert "" in pieces[:-1]


def test_incremental_decoder_skips_special_tokens(tok):
    dec = IncrementalDecoder(tok.tok)
    out = "".join(dec.push(i) for i in tok.encode("Hello<|im_end|>")) + dec.flush()
    assert out == "Hello"


def test_stop_checker_holds_back_possible_stop_prefix():
    sc = StopChecker(["###", "\nUser:"])
    assert sc.push("Hello #") == "Hello "
    assert sc.push("# not") == "## not"
    assert sc.push(" end\nUs") == " end"
    assert sc.push("er:") == "" and sc.stopped
    assert sc.push("more") == "" and sc.flush() == ""


def test_stop_checker_picks_the_stop_complete_first_whatever_the_pushes():
    """'#' is complete at 3, 'a#a' (which starts earlier) only at 4: a stream cut at '#' never sees 'a#a'."""
    for pushes in (["aa#a"], ["aa#", "a"], ["a", "a", "#", "a"]):
        sc = StopChecker(["#", "a#a"])
        assert "".join(sc.push(t) for t in pushes) + sc.flush() == "aa" and sc.stopped


def test_stop_checker_flush_returns_held_text_when_no_stop():
    sc = StopChecker(["STOP"])
    assert sc.push("go ST") == "go "
    assert not sc.stopped and sc.flush() == "ST"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab#\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_checker_output_is_text_before_first_stop(text, stops, cuts):
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]  # earliest complete stop
    expected = text[: min(hits)[1]] if hits else text
    sc = StopChecker(stops)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    out = "".join(sc.push(text[a:b]) for a, b in zip(bounds, bounds[1:])) + sc.flush()
    assert out == expected
    assert sc.stopped == bool(hits)
