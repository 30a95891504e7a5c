"""Engine text output with the real tokenizer: stop sequences, streaming text, the real base model."""

import dataclasses

import pytest
import torch
from engine_fixtures import one_torch_thread  # noqa: F401 (autouse fixture)

from deltazip.convert.base import default_base_dir
from deltazip.model.loader import load_model
from deltazip.model.sampling import SamplingParams
from deltazip.model.synthetic import random_model, tiny_config
from deltazip.model.tokenizer import Tokenizer
from services.worker.engine.engine import EngineConfig, LLMEngine
from services.worker.engine.sequence import FinishReason


@pytest.fixture(scope="module")
def base_dir():
    return default_base_dir()


@pytest.fixture(scope="module")
def tok(base_dir):
    return Tokenizer.from_dir(base_dir)


@pytest.fixture(scope="module")
def tiny_full_vocab(tok):
    # Random weights over SmolLM2's vocabulary: arbitrary (often multi-byte) token streams.
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return cfg


def _engine(cfg, tok, seed=0):
    return LLMEngine(random_model(cfg, seed=seed), EngineConfig(num_kv_blocks=64, block_size=8), tokenizer=tok)


def _stream(engine, rid):
    pieces, ids, reason = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                pieces.append(out.text)
                ids += out.token_ids
                reason = out.finish_reason
    return pieces, ids, reason


def test_stream_text_equals_decode_and_stop_cuts_it(tiny_full_vocab, tok):
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = _engine(tiny_full_vocab, tok)
    engine.add_request("free", prompt, params)
    pieces, ids, reason = _stream(engine, "free")
    full = "".join(pieces)
    assert full == tok.decode(ids) and reason is FinishReason.LENGTH and len(ids) == 24
    assert all("\ufffd" not in p for p in pieces[:-1])
    # Stop at a piece of text that appears in the middle of that same output.
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    engine = _engine(tiny_full_vocab, tok)
    engine.add_request("cut", prompt, dataclasses.replace(params, stop=(stop,)))
    pieces, ids, reason = _stream(engine, "cut")
    assert "".join(pieces) == full[: full.index(stop)] and reason is FinishReason.STOP
    assert len(ids) < 24


def test_real_base_model_answers_and_stops(base_dir, tok):
    model = load_model(base_dir, dtype=torch.float32)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32, block_size=16), tokenizer=tok)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    engine.add_request("paris", prompt, SamplingParams(temperature=0, max_tokens=16))
    engine.add_request("cut", prompt, SamplingParams(temperature=0, max_tokens=16, stop=["Paris"]))
    results = engine.run_until_done()
    assert "Paris" in results["paris"][1] and results["paris"][2] is FinishReason.STOP
    assert results["paris"][0][-1] in tok.eos_token_ids
    text, reason = results["cut"][1], results["cut"][2]
    assert reason is FinishReason.STOP and "Paris" not in text and results["paris"][1].startswith(text)
