"""Delta store faults with real store processes: killed mid-fetch, and a disk that fills up during a push.

Promises: a fetch cut by a store dying (kill -9) resumes at the byte offset it reached, on another store, or on
the same store after it restarts, and the artifact in the cache verifies against every sha256; a push that runs
out of disk fails with RESOURCE_EXHAUSTED saying the disk is full, leaves no file (staging removed) and no
registry entry, and the store keeps serving.
"""

import resource
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import redis

from deltazip.artifact import verify
from deltazip.artifact.identity import base_identity
from deltazip.client import Client
from deltazip.client.errors import ResourceExhaustedError
from deltazip.stack import stop
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc
from services.worker.errors import StoreUnavailableError
from services.worker.fetcher import DeltaFetcher
from services.worker.store_client import GrpcStoreSource
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 * 1024  # a kill after a few chunks is well before the end of the big artifact below
# More bytes than gRPC's flow-control window (grown by BDP probing) plus both loopback socket buffers can hold:
# with the tiny models' ~300 KB artifact the store could hand over every byte before the kill landed, and the
# second store was then never asked (CI, session 13).
BIG_ARTIFACT_MIN_BYTES = 32 << 20


@pytest.fixture(scope="module")
def big_delta(tmp_path_factory):
    """(base dir, dense delta artifact) for a 2-layer model with hidden 1024: ~37 MB of fp16 delta."""
    from deltazip.artifact import write_dense_delta
    from deltazip.model.synthetic import tiny_config
    from tests.integration.tiny_models import write_finetune, write_tiny_base

    config = tiny_config(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=4)
    root = tmp_path_factory.mktemp("big-delta")
    base_dir, base_state = write_tiny_base(root, config)
    artifact = root / "big-delta"
    write_dense_delta(base_dir, write_finetune(base_state, root / "big-hf", seed=3, config=config), artifact)
    num_bytes = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    assert num_bytes >= BIG_ARTIFACT_MIN_BYTES, f"the artifact is {num_bytes} bytes: too small to be cut mid-fetch"
    return base_dir, artifact


class Recording:
    """A store source that records where each FetchDelta started and can kill its store after N chunks."""

    def __init__(self, source: GrpcStoreSource, proc=None, kill_after: int | None = None):
        self.source, self.proc, self.kill_after = source, proc, kill_after
        self.address = source.address
        self.starts: list[tuple[str, int]] = []
        self.num_chunks = 0

    def stat(self, name):
        return self.source.stat(name)

    def fetch(self, name, start_path, start_offset, chunk_bytes):
        self.starts.append((start_path, start_offset))
        for chunk in self.source.fetch(name, start_path, start_offset, chunk_bytes):
            self.num_chunks += 1
            yield chunk
            if self.kill_after is not None and self.num_chunks == self.kill_after:
                self.proc.popen.send_signal(signal.SIGKILL)  # the store dies between two chunks
                self.proc.popen.wait(10)


def start_store(launcher, root: Path, store_id: str):
    return launcher.start("delta_store", "--root", str(root), "--store-id", store_id, "--heartbeat-s", "0.3",
                          "--heartbeat-ttl-s", "1.5")


def test_store_killed_mid_fetch_resumes_on_another_store_by_offset(launcher, big_delta, tmp_path):
    base_dir, artifact = big_delta
    stores = [start_store(launcher, tmp_path / f"store-{i}", f"s{i}") for i in range(2)]
    for store in stores:
        with Client("127.0.0.1:1", store=store.address) as client:
            client.push(artifact, "ft-a", progress=False)
    first = Recording(GrpcStoreSource(stores[0].address), stores[0], kill_after=5)
    second = Recording(GrpcStoreSource(stores[1].address))
    fetcher = DeltaFetcher(str(tmp_path / "cache"), lambda: [first, second], base_identity=base_identity(base_dir), chunk_bytes=CHUNK)
    path, num_bytes = fetcher.fetch("ft-a")
    verify(path)
    assert first.starts[0] == ("manifest.json", 0) and first.num_chunks >= 5  # chunks in flight still arrive
    assert second.starts, "store-1 was never asked"
    resumed_path, resumed_offset = second.starts[0]
    print(f"\nstore kill: store-0 delivered {first.num_chunks} chunks, store-1 resumed at {resumed_path}@{resumed_offset}")
    assert resumed_offset > 0 or resumed_path != "manifest.json", "the second store started from scratch"
    assert second.num_chunks < -(-num_bytes // CHUNK) + 4  # it sent only the rest


def test_store_killed_mid_fetch_resumes_after_restart(launcher, big_delta, tmp_path):
    base_dir, artifact = big_delta
    root = tmp_path / "store"
    store = start_store(launcher, root, "only")
    with Client("127.0.0.1:1", store=store.address) as client:
        client.push(artifact, "ft-a", progress=False)
    dying = Recording(GrpcStoreSource(store.address), store, kill_after=7)
    fetcher = DeltaFetcher(str(tmp_path / "cache"), lambda: [dying], base_identity=base_identity(base_dir), max_attempts=2,
                           chunk_bytes=CHUNK)
    with pytest.raises(StoreUnavailableError):
        fetcher.fetch("ft-a")
    assert not (tmp_path / "cache" / "ft-a").exists(), "a partial artifact became visible"
    restarted = Recording(GrpcStoreSource(start_store(launcher, root, "only").address))
    fetcher = DeltaFetcher(str(tmp_path / "cache"), lambda: [restarted], base_identity=base_identity(base_dir), chunk_bytes=CHUNK)
    verify(fetcher.fetch("ft-a")[0])
    path, offset = restarted.starts[0]
    print(f"\nstore restart: resumed at {path}@{offset} after 7 chunks before the kill")
    assert offset > 0 or path != "manifest.json"


def small_disk(path: Path, num_bytes: int) -> str:
    """A `num_bytes` tmpfs at `path` when this process may mount (root), else '' (the test then uses RLIMIT_FSIZE)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        return ""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={num_bytes}", "tmpfs", str(path)],
                          capture_output=True, timeout=10)
    return "tmpfs" if done.returncode == 0 else ""


@pytest.mark.parametrize("how", ["tmpfs", "RLIMIT_FSIZE"])
def test_disk_full_during_push_is_resource_exhausted_and_stores_nothing(launcher, rmodels, tmp_path, how):
    """A real full filesystem (a 64 KiB tmpfs; skipped where mounting is not allowed) and the portable stand-in,
    a 64 KiB file size limit on the store process (EFBIG, handled like ENOSPC)."""
    root = tmp_path / "small-disk"
    artifact_bytes = sum(p.stat().st_size for p in rmodels.artifacts["ft-a"].rglob("*") if p.is_file())
    store_root = root / "store"
    if how == "tmpfs":
        if not small_disk(root, 64 * 1024):
            pytest.skip("cannot mount a tmpfs here (not root); the RLIMIT_FSIZE variant covers the store's handling")
        store = start_store(launcher, store_root, "small")
    else:
        root.mkdir()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # inherited by the child only while set
        try:
            store = start_store(launcher, store_root, "small")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        assert artifact_bytes > 64 * 1024
        with Client("127.0.0.1:1", store=store.address) as client:
            with pytest.raises(ResourceExhaustedError) as err:
                client.push(rmodels.artifacts["ft-a"], "ft-a", progress=False)
            print(f"\ndisk full ({how}): {err.value}")
            assert "disk" in err.value.message and "nothing was stored" in err.value.message
            assert sorted(p.name for p in store_root.iterdir()) == [], "staging or partial files left behind"
        r = redis.Redis.from_url(launcher.redis_url, decode_responses=True)
        assert not r.exists("dz:model:ft-a")
        with grpc.insecure_channel(store.address) as channel:
            listed = delta_store_pb2_grpc.DeltaStoreStub(channel).ListDeltas(delta_store_pb2.ListDeltasRequest(),
                                                                             timeout=10)
        assert not listed.models
        assert store.popen.poll() is None, "the store died"
    finally:
        stop(store)
        if how == "tmpfs":
            subprocess.run(["umount", str(root)], timeout=10)
