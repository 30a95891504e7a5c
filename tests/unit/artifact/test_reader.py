"""read_shard / load_delta: one read into one buffer, hashed as read, tensors as views of it."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save

from deltazip.artifact import CorruptArtifactError, load_delta, read_manifest
from deltazip.artifact.manifest import ShardEntry
from deltazip.artifact.reader import read_shard


def _shard(tmp_path, tensors: dict[str, torch.Tensor]) -> tuple[bytes, ShardEntry]:
    data = save(tensors)
    (tmp_path / "s.safetensors").write_bytes(data)
    return data, ShardEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())


MIXED = {  # every dtype the reader maps (safetensors' writer aligns each tensor to its own dtype)
    "a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5).half(), "c": torch.randn(2, 3).bfloat16(),
    "d": torch.randn(4, 4), "e": torch.arange(6, dtype=torch.int32).reshape(2, 3), "f": torch.tensor([True, False]),
    "g": torch.arange(-3, 3, dtype=torch.int8), "h": torch.arange(4, dtype=torch.int64), "i": torch.randn(3).double(),
    "j": torch.arange(2, dtype=torch.int16), "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4),
}
_NAMES = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32"}


def _unaligned(tmp_path) -> tuple[dict[str, torch.Tensor], ShardEntry]:
    """A safetensors file as another writer may lay it out: 3 uint8 bytes, then fp16 and fp32 at odd offsets."""
    tensors = {"u": torch.arange(3, dtype=torch.uint8), "h": torch.randn(5).half(), "f": torch.randn(2, 2)}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).flatten().numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = len(head).to_bytes(8, "little") + head + b"".join(blobs)
    (tmp_path / "s.safetensors").write_bytes(data)
    return tensors, ShardEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("chunk", [None, 7])  # 7: the read and the hash in many small chunks
def test_read_shard_equals_safetensors_and_shares_one_buffer(tmp_path, monkeypatch, chunk):
    from deltazip.artifact import reader

    if chunk:
        monkeypatch.setattr(reader, "_READ_CHUNK", chunk)
    data, entry = _shard(tmp_path, MIXED)
    got = read_shard(tmp_path, "s.safetensors", entry)
    want = safetensors_load(data)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor), name
    storages = {got[n].untyped_storage().data_ptr() for n in MIXED if n != "empty"}
    assert len(storages) == 1 and got["d"].untyped_storage().nbytes() == len(data)  # views of the one buffer read
    got["d"] += 1  # writable, and its neighbours untouched
    assert torch.equal(got["c"], want["c"]) and torch.equal(got["e"], want["e"])


def test_tensors_at_offsets_unaligned_for_their_dtype_are_copied_out(tmp_path):
    want, entry = _unaligned(tmp_path)
    got = read_shard(tmp_path, "s.safetensors", entry)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert got["h"].untyped_storage().nbytes() == 10  # its own copy: fp16 at an odd offset
    assert got["u"].untyped_storage().nbytes() == entry.size  # a view


def test_read_shard_refuses_changed_or_resized_bytes(tmp_path):
    data, entry = _shard(tmp_path, MIXED)
    path = tmp_path / "s.safetensors"
    flipped = bytearray(data)
    flipped[-5] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptArtifactError, match="re-fetch"):
        read_shard(tmp_path, "s.safetensors", entry)
    unchecked = read_shard(tmp_path, "s.safetensors", entry, check=False)  # what an unchecked read gets
    assert any(not torch.equal(unchecked[n], t) for n, t in safetensors_load(data).items())
    for wrong in (data[:-1], data + b"\0"):
        path.write_bytes(wrong)
        with pytest.raises(CorruptArtifactError, match="re-fetch"):
            read_shard(tmp_path, "s.safetensors", entry)


def _raw_file(tmp_path, header: object, data: bytes) -> ShardEntry:
    head = json.dumps(header).encode()
    blob = len(head).to_bytes(8, "little") + head + data
    (tmp_path / "s.safetensors").write_bytes(blob)
    return ShardEntry(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())


@pytest.mark.parametrize("header, data", [
    ([1, 2], b""),  # not an object
    ({"x": 3}, b""),  # an entry that is not an object
    ({"x": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),  # no dtype
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}}, b"\0" * 4),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),  # offsets vs shape
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},  # two tensors over the same bytes
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),  # a gap before it
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6),  # bytes left over
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2),  # past the end
])
def test_read_shard_refuses_a_malformed_header_whose_hash_matches(tmp_path, header, data):
    """What the safetensors format forbids is a CorruptArtifactError, whatever the shape of the mistake (the hash
    only says the bytes are the ones written, not that a writer wrote them right)."""
    entry = _raw_file(tmp_path, header, data)
    with pytest.raises(CorruptArtifactError, match="shard"):
        read_shard(tmp_path, "s.safetensors", entry)


def test_read_shard_refuses_bytes_that_are_no_safetensors(tmp_path):
    data, _ = _shard(tmp_path, {"x": torch.ones(4)})
    head = int.from_bytes(data[:8], "little")
    for bad in (data[:5], (len(data)).to_bytes(8, "little") + data[8:], data[:8] + b"{" * head + data[8 + head:]):
        (tmp_path / "s.safetensors").write_bytes(bad)
        entry = ShardEntry(size=len(bad), sha256=hashlib.sha256(bad).hexdigest())
        with pytest.raises(CorruptArtifactError, match="shard"):
            read_shard(tmp_path, "s.safetensors", entry)


@pytest.mark.parametrize("known_size", [True, False])
def test_zstd_shards_are_read_with_and_without_their_raw_size(tmp_path, known_size):
    import zstandard

    data = save(MIXED)
    packed = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "s.zst").write_bytes(packed)
    entry = ShardEntry(size=len(packed), sha256=hashlib.sha256(packed).hexdigest(), codec="zstd",
                       raw_size=len(data) if known_size else None)
    got = read_shard(tmp_path, "s.zst", entry)
    for name, tensor in safetensors_load(data).items():
        assert torch.equal(got[name], tensor), name
    if known_size:
        short = ShardEntry(size=entry.size, sha256=entry.sha256, codec="zstd", raw_size=len(data) - 1)
        with pytest.raises(CorruptArtifactError, match="decompress"):
            read_shard(tmp_path, "s.zst", short)
    garbage = b"not zstd at all"
    (tmp_path / "s.zst").write_bytes(garbage)
    bad = ShardEntry(size=len(garbage), sha256=hashlib.sha256(garbage).hexdigest(), codec="zstd",
                     raw_size=len(data) if known_size else None)
    with pytest.raises(CorruptArtifactError, match="decompress"):
        read_shard(tmp_path, "s.zst", bad)


def test_a_dtype_the_reader_does_not_map_goes_through_safetensors(tmp_path):
    tensors = {"f8": torch.randn(4).to(torch.float8_e4m3fn), "x": torch.ones(2)}
    data, entry = _shard(tmp_path, tensors)
    got = read_shard(tmp_path, "s.safetensors", entry)
    assert got["f8"].dtype == torch.float8_e4m3fn and torch.equal(got["f8"].float(), tensors["f8"].float())
    assert torch.equal(got["x"], tensors["x"])


def test_load_delta_of_a_subset_copies_it_out_of_the_shard(dense_artifact):
    """A subset keeps only its own bytes alive (not the whole shard's buffer); the whole artifact's tensors are
    views of their shards' buffers, and both equal what the artifact holds."""
    manifest = read_manifest(dense_artifact)
    name = sorted(manifest.tensors)[0]
    everything = load_delta(dense_artifact, "cpu")
    (part,) = load_delta(dense_artifact, "cpu", names={name}).values()
    delta = part.delta
    assert delta.untyped_storage().nbytes() == delta.numel() * delta.element_size()
    assert torch.equal(delta, everything[name].delta)
    shard_size = manifest.shards[manifest.tensors[name].shard].size
    assert everything[name].delta.untyped_storage().nbytes() == shard_size  # a view of the shard read


def test_a_stamp_spares_the_hash_only_while_the_shard_is_unchanged(dense_artifact, tmp_path, monkeypatch):
    """load_delta(trust_stamp=True) hashes no shard its folder's verified stamp vouches for (the manifest's sha256;
    the same size, mtime, ctime, inode and device on the opened file); a shard rewritten since, a stamp with another
    sha256, the default (trust_stamp=False) and a folder without a stamp are hashed, so changed bytes are refused."""
    import hashlib as real_hashlib
    import os
    import shutil
    import types

    from deltazip.artifact import reader
    from deltazip.artifact.stamp import STAMP_FILE, drop_stamp, stamped, write_stamp

    art = tmp_path / "art"
    shutil.copytree(dense_artifact, art)
    manifest = read_manifest(art)
    shard = sorted(manifest.shards)[0]
    hashed = []

    class Counting:
        def __init__(self):
            self._d = real_hashlib.sha256()

        def update(self, data):
            hashed.append(len(data))
            self._d.update(data)

        def hexdigest(self):
            return self._d.hexdigest()

    monkeypatch.setattr(reader, "hashlib", types.SimpleNamespace(sha256=Counting))

    def hashed_bytes(**kw):
        hashed.clear()
        load_delta(art, "cpu", **kw)
        return sum(hashed)

    shard_bytes = sum(e.size for e in manifest.shards.values())
    assert hashed_bytes(trust_stamp=True) == shard_bytes  # no stamp: every shard hashed
    write_stamp(art, {name: entry.sha256 for name, entry in manifest.shards.items()})
    assert hashed_bytes(trust_stamp=True) == 0
    assert hashed_bytes() == shard_bytes  # the library's default hashes anyway
    write_stamp(art, {shard: "0" * 64})  # a stamp that does not name the manifest's sha256
    assert hashed_bytes(trust_stamp=True) == shard_bytes
    write_stamp(art, {name: entry.sha256 for name, entry in manifest.shards.items()})
    st = (art / shard).stat()
    data = bytearray((art / shard).read_bytes())
    data[-1] ^= 1  # the same size, new bytes, and the old mtime put back: ctime still tells
    (art / shard).write_bytes(bytes(data))
    os.utime(art / shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (art / shard).stat().st_mtime_ns == st.st_mtime_ns and shard not in stamped(art)
    with pytest.raises(CorruptArtifactError):
        load_delta(art, "cpu", trust_stamp=True)
    drop_stamp(art)
    assert not (art / STAMP_FILE).exists() and stamped(art) == {}
    for junk in ("{not json", "[1, 2]", "null", '{"version": 1, "files": {"x": {"stat": "ab"}}}', "[" * 100000):
        (art / STAMP_FILE).write_text(junk)
        assert stamped(art) == {}
    assert not [p for p in art.iterdir() if p.name.startswith(STAMP_FILE + ".tmp")]  # no temp file left


def test_read_buffers_are_reused_only_when_nothing_kept_views_them(dense_artifact):
    """Loads through a ReadBuffers lease equal plain loads; a lease that copies everything out gives its buffer
    back and the next load reads into that same memory; a buffer a kept tensor still views, and the buffers of a
    lease that ends without `done` (an error), are never handed out again; at most `keep` stay idle."""
    from deltazip.artifact.reader import ReadBuffers

    plain = load_delta(dense_artifact, "cpu")
    pool = ReadBuffers(keep=1)
    with pool.lease() as lease:
        first = load_delta(dense_artifact, "cpu", buffer=lease.take)
        copied = {name: d.delta.clone() for name, d in first.items()}
        ptrs = {d.delta.untyped_storage().data_ptr() for d in first.values()}
        lease.done(copied.values())
    assert len(read_manifest(dense_artifact).shards) == 1
    assert pool.idle_bytes == sum(e.size for e in read_manifest(dense_artifact).shards.values())
    for name, d in plain.items():
        assert torch.equal(copied[name], d.delta)
    with pool.lease() as lease:
        second = load_delta(dense_artifact, "cpu", buffer=lease.take)
        assert {d.delta.untyped_storage().data_ptr() for d in second.values()} == ptrs  # the same memory again
        for name, d in plain.items():
            assert torch.equal(second[name].delta, d.delta)
        lease.done(second.values())  # kept as views: the buffer stays theirs
    assert pool.idle_bytes == 0
    with pool.lease() as lease:
        third = load_delta(dense_artifact, "cpu", buffer=lease.take)
        assert not {d.delta.untyped_storage().data_ptr() for d in third.values()} & ptrs
    assert pool.idle_bytes == 0  # no `done`: nothing given back
    for name, d in plain.items():
        assert torch.equal(second[name].delta, d.delta)  # never overwritten
    with pool.lease() as a, pool.lease() as b:
        assert a.take(10).numel() == 10 and b.take(20).numel() == 20
        a.done([]), b.done([])
    assert pool.idle_bytes == 20  # keep=1: the larger stays


def test_zstd_shards_read_through_a_lease_take_both_buffers_and_give_them_back(tmp_path):
    """A zstd shard with its raw size takes two buffers of a lease (the compressed bytes, then the safetensors
    bytes the tensors view); copied out, both go back, and the next read reuses them with the same result."""
    import zstandard

    from deltazip.artifact.reader import ReadBuffers

    data = save(MIXED)
    packed = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "s.zst").write_bytes(packed)
    entry = ShardEntry(size=len(packed), sha256=hashlib.sha256(packed).hexdigest(), codec="zstd", raw_size=len(data))
    pool, sizes = ReadBuffers(keep=2), []
    for _ in range(2):
        with pool.lease() as lease:
            got = read_shard(tmp_path, "s.zst", entry, buffer=lambda n: sizes.append(n) or lease.take(n))
            copies = {name: t.clone() for name, t in got.items()}
            lease.done(copies.values())
        for name, tensor in safetensors_load(data).items():
            assert torch.equal(copies[name], tensor), name
    assert sizes == [len(packed), len(data)] * 2 and pool.idle_bytes == len(packed) + len(data)


def test_a_vouched_read_refuses_a_file_swapped_in_or_written_while_unhashed(tmp_path, monkeypatch):
    """The stamp's signature is compared on the opened file: a modified copy renamed over the stamped one is hashed
    (and refused); a file whose stat changes during an unhashed read is refused."""
    import os

    from deltazip.artifact import reader
    from deltazip.artifact.stamp import signature

    data, entry = _shard(tmp_path, {"a": torch.arange(64, dtype=torch.int32)})
    vouched = signature((tmp_path / "s.safetensors").stat())
    got = read_shard(tmp_path, "s.safetensors", entry, vouched=vouched)["a"]
    assert torch.equal(got, torch.arange(64, dtype=torch.int32))
    bad = bytearray(data)
    bad[-1] ^= 1
    (tmp_path / "new").write_bytes(bytes(bad))
    os.replace(tmp_path / "new", tmp_path / "s.safetensors")
    with pytest.raises(CorruptArtifactError):
        read_shard(tmp_path, "s.safetensors", entry, vouched=vouched)
    (tmp_path / "s.safetensors").write_bytes(data)
    vouched = signature((tmp_path / "s.safetensors").stat())
    calls = []
    monkeypatch.setattr(reader, "signature", lambda st: calls.append(1) or (vouched if len(calls) == 1 else []))
    with pytest.raises(CorruptArtifactError):
        read_shard(tmp_path, "s.safetensors", entry, vouched=vouched)
    assert len(calls) == 2


def test_a_stamp_holds_only_in_the_boot_it_was_written_in(dense_artifact, tmp_path, monkeypatch):
    """A stamp records the boot id: after a reboot (a crash or power cut may have lost unwritten blocks) it vouches
    for nothing; without a boot id no stamp is written."""
    import shutil

    from deltazip.artifact import stamp

    art = tmp_path / "art"
    shutil.copytree(dense_artifact, art)
    shas = {name: entry.sha256 for name, entry in read_manifest(art).shards.items()}
    monkeypatch.setattr(stamp, "boot_id", lambda: "boot-a")
    assert stamp.write_stamp(art, shas) and set(stamp.stamped(art)) == set(shas)
    monkeypatch.setattr(stamp, "boot_id", lambda: "boot-b")
    assert stamp.stamped(art) == {}
    monkeypatch.setattr(stamp, "boot_id", lambda: None)
    assert stamp.stamped(art) == {}
    stamp.drop_stamp(art)
    assert not stamp.write_stamp(art, shas) and not (art / stamp.STAMP_FILE).exists()
