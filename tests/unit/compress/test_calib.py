"""Calibration windows: shipped default set, text and jsonl files, deterministic sampling."""

import json

import torch

from deltazip.compress.calib import DEFAULT_CALIB_FILE, load_calibration, read_documents


def test_default_set_is_shipped_and_varied():
    docs = read_documents(DEFAULT_CALIB_FILE)
    assert len(docs) > 30 and sum(len(d) for d in docs) > 10_000


def test_windows_are_deterministic_and_in_vocab(tmp_path):
    a = load_calibration(tmp_path, vocab_size=256, nsamples=8, seq_len=32, seed=1)
    b = load_calibration(tmp_path, vocab_size=256, nsamples=8, seq_len=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.max()) < 256 and not torch.equal(a, load_calibration(tmp_path, 256, 8, 32, seed=2))


def test_jsonl_rows_and_short_files(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"text": "hello world"}, {"messages": [{"role": "user", "content": "hi"}, {"content": "there"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_documents(path) == ["hello world", "hi\nthere"]
    ids = load_calibration(tmp_path, vocab_size=256, nsamples=4, seq_len=100, path=path)  # text shorter than a window
    assert ids.shape == (4, 100)
