"""Delta store as a real process with a real redis-server: push, list, stat, fetch (resume), delete, failures."""

import hashlib
import json
import os
from pathlib import Path

import grpc
import pytest

from deltazip.client import AlreadyExistsError, Client, InvalidArgumentError, NotFoundError
from deltazip.client.push import LocalFile, push_requests, scan_artifact
from deltazip.rpc.channels import sync_channel
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


def make_artifact(folder: Path, shard_bytes: tuple[int, int] = (3 * 1024 * 1024 + 17, 1000)) -> Path:
    """A folder shaped like `deltazip compress` output: manifest.json + two shards of random bytes."""
    folder.mkdir(parents=True)
    manifest = {"format": "deltazip", "version": 1, "name": "ft", "base": {"name": "tiny", "identity": "abc123"},
                "compression": {"bits": 4, "sparsity": "2:4", "group_size": 128}, "stats": {"ratio": 7.5}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for i, size in enumerate(shard_bytes, start=1):
        (folder / f"delta-{i:05d}.safetensors").write_bytes(os.urandom(size))
    return folder


def fetch(stub, name: str, start_path: str = "", start_offset: int = 0) -> dict[str, bytes]:
    """All bytes streamed by FetchDelta, per file, checking offsets and sha256 fields."""
    out: dict[str, bytearray] = {}
    for chunk in stub.FetchDelta(delta_store_pb2.FetchDeltaRequest(name=name, start_path=start_path, start_offset=start_offset)):
        assert len(chunk.data) <= 1024 * 1024
        buf = out.setdefault(chunk.path, bytearray())
        first = start_offset if chunk.path == start_path else 0
        assert chunk.offset == first + len(buf)
        buf.extend(chunk.data)
        if chunk.last_in_file and first == 0:
            assert hashlib.sha256(buf).hexdigest() == chunk.file_sha256
            assert len(buf) == chunk.file_size
    return {k: bytes(v) for k, v in out.items()}


def visible_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_push_list_stat_fetch_delete(launcher, tmp_path):
    root = tmp_path / "store"
    store = launcher.start("delta_store", "--root", str(root))
    art = make_artifact(tmp_path / "art")
    with Client("127.0.0.1:1", store=store.address) as client:
        info = client.push(art, "ft-a", progress=False)
        assert (info.name, info.base_identity, info.compression, info.compression_ratio) == ("ft-a", "abc123", "4bit-2:4-g128", 7.5)
        assert info.artifact_bytes == sum(p.stat().st_size for p in art.iterdir())
        assert [m.name for m in client.stored_models()] == ["ft-a"]
        stat_info, files = client.stat("ft-a")
        assert stat_info == info
        assert [f.path for f in files] == ["manifest.json", "delta-00001.safetensors", "delta-00002.safetensors"]

        stub = delta_store_pb2_grpc.DeltaStoreStub(sync_channel(store.address))
        whole = fetch(stub, "ft-a")
        assert whole == {p.name: p.read_bytes() for p in art.iterdir()}
        resumed = fetch(stub, "ft-a", "delta-00001.safetensors", 1024 * 1024 + 5)
        assert resumed["delta-00001.safetensors"] == whole["delta-00001.safetensors"][1024 * 1024 + 5 :]
        assert resumed["delta-00002.safetensors"] == whole["delta-00002.safetensors"]
        assert "manifest.json" not in resumed

        with pytest.raises(AlreadyExistsError, match="deltazip delete"):
            client.push(art, "ft-a", progress=False)
        assert client.delete("ft-a")
        with pytest.raises(NotFoundError, match="deltazip models"):
            client.stat("ft-a")
        with pytest.raises(NotFoundError):
            client.delete("ft-a")
    assert visible_entries(root) == []


def test_bad_checksum_leaves_nothing(launcher, tmp_path):
    root = tmp_path / "store"
    store = launcher.start("delta_store", "--root", str(root))
    art = make_artifact(tmp_path / "art")
    files = scan_artifact(art)
    lying = [LocalFile(f.path, f.abspath, f.size, "0" * 64) if f.path.startswith("delta-00001") else f for f in files]
    stub = delta_store_pb2_grpc.DeltaStoreStub(sync_channel(store.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.PushDelta(push_requests("ft-bad", lying))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in err.value.details() and "push again" in err.value.details()
    assert visible_entries(root) == []


def test_aborted_push_leaves_nothing(launcher, tmp_path):
    root = tmp_path / "store"
    store = launcher.start("delta_store", "--root", str(root))
    files = scan_artifact(make_artifact(tmp_path / "art"))
    stub = delta_store_pb2_grpc.DeltaStoreStub(sync_channel(store.address))

    def cut_short():
        for i, request in enumerate(push_requests("ft-cut", files)):
            if i == 3:
                return  # client half-closes mid-file
            yield request

    with pytest.raises(grpc.RpcError) as err:
        stub.PushDelta(cut_short())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cut short" in err.value.details()
    assert visible_entries(root) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 129])
def test_path_like_names_rejected(launcher, tmp_path, name):
    root = tmp_path / "store"
    store = launcher.start("delta_store", "--root", str(root))
    with Client("127.0.0.1:1", store=store.address) as client:
        with pytest.raises(InvalidArgumentError, match="invalid model name"):
            client.push(make_artifact(tmp_path / "art"), name, progress=False)
        with pytest.raises(InvalidArgumentError):
            client.stat(name)
    assert visible_entries(root) == []


def test_file_paths_confined_to_artifact(launcher, tmp_path):
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    files = scan_artifact(make_artifact(tmp_path / "art"))
    escaping = [*files, LocalFile("../../etc/evil", files[1].abspath, files[1].size, files[1].sha256)]
    stub = delta_store_pb2_grpc.DeltaStoreStub(sync_channel(store.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.PushDelta(push_requests("ft-evil", escaping))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid file path" in err.value.details()
    assert not (tmp_path / "etc").exists()


def test_replicas_share_one_dir_and_registry(launcher, tmp_path, redis_url):
    import redis

    root = tmp_path / "store"
    first = launcher.start("delta_store", "--root", str(root))
    second = launcher.start("delta_store", "--root", str(root))
    with Client("127.0.0.1:1") as client:
        client.push(make_artifact(tmp_path / "art"), "ft-shared", progress=False, store=first.address)
        assert [m.name for m in client.stored_models(store=second.address)] == ["ft-shared"]
        assert client.stat("ft-shared", store=second.address)[0].base_identity == "abc123"
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert r.smembers("dz:models") == {"ft-shared"}
        assert len(r.smembers("dz:stores")) == 2
        assert r.hget("dz:model:ft-shared", "base_identity") == "abc123"
        client.delete("ft-shared", store=second.address)
        assert r.smembers("dz:models") == set()
        with pytest.raises(NotFoundError):
            client.stat("ft-shared", store=first.address)


def test_client_fetch_and_async_client(launcher, tmp_path):
    import asyncio

    from deltazip.client import AsyncClient

    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    art = make_artifact(tmp_path / "art")

    async def body():
        async with AsyncClient("127.0.0.1:1", store=store.address) as client:
            info = await client.push(art, "ft-async", progress=False)
            assert info.base_identity == "abc123"
            assert [m.name for m in await client.stored_models()] == ["ft-async"]
            out = await client.fetch("ft-async", tmp_path / "fetched-async")
            assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in art.iterdir()}
            with pytest.raises(NotFoundError):
                await client.fetch("nope", tmp_path / "nope")
            assert await client.delete("ft-async")

    asyncio.run(body())
    assert not (tmp_path / "nope").exists()
    with Client("127.0.0.1:1", store=store.address) as client:
        client.push(art, "ft-sync", progress=False)
        out = client.fetch("ft-sync", tmp_path / "fetched-sync")
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in art.iterdir())
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sigterm_stops_cleanly_and_unregisters(launcher, tmp_path, redis_url):
    import redis

    from tests.integration.procs import stop

    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert len(r.smembers("dz:stores")) == 1
    assert stop(store) == 0
    assert r.smembers("dz:stores") == set() and r.keys("dz:store:*") == []
