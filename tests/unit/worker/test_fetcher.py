"""DeltaFetcher: resume from (path, offset) on the next store, integrity and base checks, atomic placement."""

import hashlib
import json
from pathlib import Path

import pytest

from services.worker.errors import ArtifactIntegrityError, BaseMismatchError, DeltaNotFoundError, StoreUnavailableError
from services.worker.fetcher import Chunk, DeltaFetcher, RemoteArtifact, RemoteFile

BASE = "b" * 64
FILES = {
    "manifest.json": json.dumps({"base_identity": BASE, "tensors": {}}).encode(),
    "delta-00001.safetensors": bytes(range(256)) * 40,
    "delta-00002.safetensors": b"xyz" * 1000,
}


class FakeStore:
    """Serves FILES in chunks; dies (StoreUnavailableError) after `die_after` chunks."""

    def __init__(self, address, files=FILES, die_after=None, base=BASE, corrupt=False, missing=False):
        self.address, self.files, self.die_after = address, files, die_after
        self.base, self.corrupt, self.missing = base, corrupt, missing
        self.requests = []

    def stat(self, name):
        if self.missing:
            raise DeltaNotFoundError(name)
        if self.die_after == 0:
            raise StoreUnavailableError(self.address)
        entries = tuple(RemoteFile(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in self.files.items())
        return RemoteArtifact(name, self.base, entries)

    def fetch(self, name, start_path, start_offset, chunk_bytes):
        self.requests.append((start_path, start_offset))
        sent, started = 0, False
        for path, data in self.files.items():
            started = started or path == start_path
            if not started:
                continue
            offset = start_offset if path == start_path else 0
            while offset < len(data):
                if self.die_after is not None and sent >= self.die_after:
                    raise StoreUnavailableError(f"{self.address} died")
                piece = data[offset:offset + chunk_bytes]
                if self.corrupt:
                    piece = bytes(b ^ 1 for b in piece)
                yield Chunk(path, offset, piece, offset + len(piece) == len(data))
                offset += len(piece)
                sent += 1


def manifest_identity(artifact_dir):
    return json.loads((Path(artifact_dir) / "manifest.json").read_text())["base_identity"]


def fetcher(tmp_path, stores, **kw):
    return DeltaFetcher(str(tmp_path / "cache"), lambda: stores, BASE, chunk_bytes=1000,
                        manifest_identity=manifest_identity, **kw)


def assert_complete(path):
    for rel, data in FILES.items():
        assert (Path(path) / rel).read_bytes() == data


def test_fetch_places_verified_artifact(tmp_path):
    path, num_bytes = fetcher(tmp_path, [FakeStore("s1")]).fetch("m")
    assert path == str(tmp_path / "cache" / "m") and num_bytes == sum(map(len, FILES.values()))
    assert_complete(path)
    assert not any((tmp_path / "cache" / ".partial").iterdir())


def test_fetch_stamps_every_file_it_hashed(tmp_path):
    """The placed folder carries a verified stamp naming each file's sha256 as it is on disk (loads skip hashing)."""
    from deltazip.artifact.stamp import stamped

    path, _ = fetcher(tmp_path, [FakeStore("s1", die_after=4), FakeStore("s2")]).fetch("m")  # resumed midway
    assert {rel: sha for rel, (sha, _) in stamped(path).items()} == {rel: hashlib.sha256(data).hexdigest()
                                                                     for rel, data in FILES.items()}


def test_store_dies_midway_and_next_store_resumes_from_offset(tmp_path):
    s1, s2 = FakeStore("s1", die_after=4), FakeStore("s2")
    path, _ = fetcher(tmp_path, [s1, s2]).fetch("m")
    assert_complete(path)
    # 4 chunks: manifest (1 chunk) + 3000 bytes of shard 1
    assert s2.requests == [("delta-00001.safetensors", 3000)]


def test_resume_after_crash_uses_bytes_on_disk(tmp_path):
    partial = tmp_path / "cache" / ".partial" / "m"
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_bytes(FILES["manifest.json"])
    (partial / "delta-00001.safetensors").write_bytes(FILES["delta-00001.safetensors"][:5000])
    store = FakeStore("s1")
    assert_complete(fetcher(tmp_path, [store]).fetch("m")[0])
    assert store.requests == [("delta-00001.safetensors", 5000)]


def test_first_store_down_at_stat(tmp_path):
    path, _ = fetcher(tmp_path, [FakeStore("dead", die_after=0), FakeStore("s2")]).fetch("m")
    assert_complete(path)


def test_all_stores_dead_is_unavailable_after_bounded_attempts(tmp_path):
    stores = [FakeStore("s1", die_after=0), FakeStore("s2", die_after=0)]
    with pytest.raises(StoreUnavailableError):
        fetcher(tmp_path, stores).fetch("m")
    stalled = FakeStore("s3", die_after=0)
    stalled.stat = FakeStore("ok").stat  # answers stat, then never streams a byte
    with pytest.raises(StoreUnavailableError, match="stalled"):
        fetcher(tmp_path, [stalled], max_attempts=3).fetch("m")
    assert len(stalled.requests) == 3


def test_missing_model_is_not_found(tmp_path):
    with pytest.raises(DeltaNotFoundError, match="push it first"):
        fetcher(tmp_path, [FakeStore("s1", missing=True)]).fetch("m")


def test_delta_for_another_base_is_refused(tmp_path):
    with pytest.raises(BaseMismatchError, match="another base|against base"):
        fetcher(tmp_path, [FakeStore("s1", base="c" * 64)]).fetch("m")
    assert not (tmp_path / "cache" / "m").exists()


def test_corrupt_bytes_fail_integrity_and_leave_nothing_visible(tmp_path):
    with pytest.raises(ArtifactIntegrityError):
        fetcher(tmp_path, [FakeStore("s1", corrupt=True)], max_attempts=2).fetch("m")
    assert not (tmp_path / "cache" / "m").exists()


def test_cached_lists_complete_artifacts(tmp_path):
    f = fetcher(tmp_path, [FakeStore("s1")])
    f.fetch("m")
    assert [(n, b) for n, _, b in f.cached()] == [("m", sum(map(len, FILES.values())))]
