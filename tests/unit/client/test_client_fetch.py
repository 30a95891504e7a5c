"""Download bookkeeping: resume points, sha256 checks, atomic commit."""

import hashlib

import pytest

from deltazip.client import DeltaZipError
from deltazip.client.fetch import Download
from deltazip.v1 import delta_store_pb2

FILES = {"manifest.json": b"{}", "a": b"x" * 10, "b": b""}


def chunks(path: str, start: int = 0, step: int = 4, corrupt: bool = False):
    data = FILES[path]
    sha = hashlib.sha256(b"wrong" if corrupt else data).hexdigest()
    offsets = list(range(start, len(data), step)) or [start]
    for off in offsets:
        piece = data[off : off + step]
        yield delta_store_pb2.FetchDeltaChunk(path=path, offset=off, data=piece, file_size=len(data), file_sha256=sha,
                                              last_in_file=off + len(piece) >= len(data))


def test_resume_points_and_commit(tmp_path):
    d = Download("m", tmp_path / "out")
    assert d.request().start_path == ""
    for c in chunks("manifest.json"):
        d.add(c)
    assert (d.request().start_path, d.request().start_offset) == ("manifest.json", 2)
    first_two = list(chunks("a"))[:2]
    for c in first_two:
        d.add(c)
    assert (d.request().start_path, d.request().start_offset) == ("a", 8)
    d.add(delta_store_pb2.FetchDeltaChunk(path="manifest.json", offset=2, data=b"", file_size=2, last_in_file=True))
    for c in chunks("a", start=8):
        d.add(c)
    for c in chunks("b"):
        d.add(c)
    out = d.commit()
    d.cleanup()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_corrupt_file_is_rejected_and_nothing_left(tmp_path):
    d = Download("m", tmp_path / "out")
    with pytest.raises(DeltaZipError, match="sha256"):
        for c in chunks("a", corrupt=True):
            d.add(c)
    d.cleanup()
    assert list(tmp_path.iterdir()) == []


def test_gap_is_rejected(tmp_path):
    d = Download("m", tmp_path / "out")
    with pytest.raises(DeltaZipError, match="skipped"):
        d.add(list(chunks("a"))[1])
    d.cleanup()
