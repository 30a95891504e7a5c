"""Store internals on a temp dir: names, paths, staged pushes, fetch plans, manifest summaries."""

import hashlib
import json

import pytest

from deltazip.rpc.errors import AlreadyExists, InvalidArgument, OutOfRange
from services.delta_store import fetch
from services.delta_store.manifest import read_summary
from services.delta_store.push import PushSession
from services.delta_store.storage import DeltaStorage, StoredFile, validate_name, validate_relpath

MANIFEST = json.dumps({"base": {"identity": "id"}, "compression": "dense-fp16"}).encode()


def entry(path: str, data: bytes) -> StoredFile:
    return StoredFile(path, len(data), hashlib.sha256(data).hexdigest())


def push(storage: DeltaStorage, name: str, blobs: dict[str, bytes], overwrite: bool = False, lie: bool = False):
    files = [entry(p, d) for p, d in blobs.items()]
    if lie:
        files[-1] = StoredFile(files[-1].path, files[-1].size, "f" * 64)
    session = PushSession(storage, name, files, max_bytes=1 << 30)
    try:
        for path, data in blobs.items():
            for off in range(0, len(data), 4):
                session.write(path, off, data[off : off + 4])
        session.finish()
        storage.commit(session.staging, name, files, overwrite)
    except BaseException:
        session.abort()
        raise


@pytest.mark.parametrize("name", ["ok", "A.b-c_d", "0" * 128])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".x", "-x", "a b", "0" * 129, "é"])
def test_invalid_names(name):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        validate_name(name)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", ".hidden", "a\\b", ""])
def test_invalid_relpaths(path):
    with pytest.raises(InvalidArgument):
        validate_relpath(path)


def test_push_commit_and_overwrite(tmp_path):
    storage = DeltaStorage(tmp_path)
    push(storage, "m", {"manifest.json": MANIFEST, "s/x.bin": b"0123456789", "empty": b""})
    assert storage.names() == ["m"] and (tmp_path / "m" / "s" / "x.bin").read_bytes() == b"0123456789"
    assert (tmp_path / "m" / "empty").read_bytes() == b""
    with pytest.raises(AlreadyExists):
        push(storage, "m", {"manifest.json": MANIFEST})
    push(storage, "m", {"manifest.json": MANIFEST, "y": b"new"}, overwrite=True)
    assert [f.path for f in storage.files("m")] == ["manifest.json", "y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_push_leaves_nothing(tmp_path):
    storage = DeltaStorage(tmp_path)
    with pytest.raises(InvalidArgument, match="does not match"):
        push(storage, "m", {"manifest.json": MANIFEST, "x": b"abc"}, lie=True)
    with pytest.raises(InvalidArgument, match="offset"):
        session = PushSession(storage, "m", [entry("manifest.json", MANIFEST)], 1 << 30)
        try:
            session.write("manifest.json", 3, b"x")
        finally:
            session.abort()
    assert list(tmp_path.iterdir()) == []


def test_header_rules(tmp_path):
    storage = DeltaStorage(tmp_path)
    with pytest.raises(InvalidArgument, match="no manifest.json"):
        PushSession(storage, "m", [entry("x", b"1")], 1 << 30)
    with pytest.raises(InvalidArgument, match="listed twice"):
        PushSession(storage, "m", [entry("manifest.json", b"1"), entry("manifest.json", b"1")], 1 << 30)
    with pytest.raises(InvalidArgument, match="at most"):
        PushSession(storage, "m", [entry("manifest.json", b"12345")], 4)
    assert list(tmp_path.iterdir()) == []


def test_fetch_plan_resume_rules():
    files = [StoredFile("manifest.json", 5, "a" * 64), StoredFile("s1", 100, "b" * 64), StoredFile("s2", 7, "c" * 64)]
    assert fetch.plan(files, "", 0) == [(f, 0) for f in files]
    assert fetch.plan(files, "s1", 40) == [(files[1], 40), (files[2], 0)]
    with pytest.raises(InvalidArgument, match="not a file"):
        fetch.plan(files, "nope", 0)
    with pytest.raises(OutOfRange):
        fetch.plan(files, "s2", 8)
    with pytest.raises(InvalidArgument, match="needs start_path"):
        fetch.plan(files, "", 3)


@pytest.mark.parametrize("manifest, expected", [
    ({"base": {"identity": "i", "name": "llama"}, "compression": {"bits": 4, "sparsity": "2:4", "group_size": 128},
      "stats": {"ratio": 5.0}}, ("i", "llama", "4bit-2:4-g128", 5.0)),
    ({"base": "llama", "compression": {"method": "dense"}}, ("", "llama", "dense-fp16", 0.0)),
    ({"base_identity": "j", "compression_ratio": 2}, ("j", "", "", 2.0)),
    ({"base": 3, "compression": [1], "stats": "x"}, ("", "", "", 0.0)),
])
def test_manifest_summary_is_defensive(tmp_path, manifest, expected):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    s = read_summary(tmp_path / "manifest.json")
    assert (s.base_identity, s.base_name, s.compression, s.compression_ratio) == expected


def test_manifest_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        read_summary(tmp_path / "manifest.json")
