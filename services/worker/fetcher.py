"""DeltaFetcher: copies an artifact from any live delta store into the local disk cache.

Stat first (file list + base identity), refuse a delta made against another base, then stream the
files with FetchDelta into `<cache>/.partial/<name>/`, resuming from (path, offset) on the next store
when one dies, checking each file's size and sha256, stamping the folder as verified (deltazip/artifact/stamp.py:
loads from the cache then skip hashing unchanged shards), and finally renaming the folder into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from deltazip.artifact.stamp import STAMP_FILE, write_stamp
from deltazip.logs import get_logger
from services.worker.errors import (
    ArtifactIntegrityError,
    BaseMismatchError,
    DeltaNotFoundError,
    StoreUnavailableError,
)

log = get_logger("services.worker.fetcher")
MAX_TOTAL_ATTEMPTS = 64  # hard bound on reconnects for one fetch, whatever progress is made


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class RemoteArtifact:
    name: str
    base_identity: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True, slots=True)
class Chunk:
    path: str
    offset: int
    data: bytes
    last_in_file: bool = False


class StoreSource(Protocol):
    """One delta store. Raises DeltaNotFoundError / StoreUnavailableError."""

    address: str

    def stat(self, name: str) -> RemoteArtifact: ...

    def fetch(self, name: str, start_path: str, start_offset: int, chunk_bytes: int) -> Iterator[Chunk]: ...


NO_STORE = "no delta store is alive (none in Redis, none configured with --store-addresses)"


class DeltaFetcher:
    """fetch(name) -> (local dir, bytes): a verified artifact in the disk cache."""

    def __init__(self, cache_dir: str, sources: Callable[[], list[StoreSource]], base_identity: str,
                 max_attempts: int = 5, chunk_bytes: int = 1 << 20,
                 manifest_identity: Callable[[str], str] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self._sources = sources
        self._base_identity = base_identity
        self._max_attempts = max_attempts
        self._chunk_bytes = chunk_bytes
        self._manifest_identity = manifest_identity or manifest_base_identity

    def close(self) -> None:
        """Nothing to release: the sources belong to their StoreDirectory (ProcessFetcher stops its children)."""

    def cached(self) -> list[tuple[str, str, int]]:
        """Complete artifacts already in the cache: (name, dir, bytes)."""
        if not self.cache_dir.is_dir():
            return []
        found = []
        for d in sorted(self.cache_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").is_file():
                found.append((d.name, str(d), dir_bytes(d)))
        return found

    def fetch(self, name: str) -> tuple[str, int]:
        """Download `name` into the cache (resuming across stores); returns (dir, bytes)."""
        sources = self._sources()
        if not sources:
            raise StoreUnavailableError(NO_STORE)
        artifact, sources = self._stat(name, sources)
        self._check_base(name, artifact.base_identity)
        partial = self.cache_dir / ".partial" / name
        partial.mkdir(parents=True, exist_ok=True)
        self._download(artifact, partial, sources)
        self._check_base(name, self._manifest_identity(str(partial)))
        _stamp(partial, artifact)
        final = self.cache_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        return str(final), sum(f.size for f in artifact.files)

    def _stat(self, name: str, sources: list[StoreSource]) -> tuple[RemoteArtifact, list[StoreSource]]:
        """Ask stores in turn; returns the artifact and the sources, the answering one first."""
        not_found = 0
        for i, source in enumerate(sources):
            try:
                return source.stat(name), sources[i:] + sources[:i]
            except DeltaNotFoundError:
                not_found += 1
            except StoreUnavailableError:
                continue
        if not_found:
            raise DeltaNotFoundError(f"model {name!r} is not in any delta store; push it first (deltazip push)")
        raise StoreUnavailableError(f"no delta store answered for {name!r}: {[s.address for s in sources]}")

    def _check_base(self, name: str, identity: str) -> None:
        if identity and identity != self._base_identity:
            raise BaseMismatchError(
                f"delta {name!r} was made against base {identity[:20]}…, this worker serves base "
                f"{self._base_identity[:20]}…; compress it against this base or send it to a matching worker")

    def _download(self, artifact: RemoteArtifact, partial: Path, sources: list[StoreSource]) -> None:
        progress = _Progress(artifact, partial)
        failures, last_error = 0, None
        for attempt in range(MAX_TOTAL_ATTEMPTS):
            pending = progress.first_incomplete()
            if pending is None:
                return
            source = sources[attempt % len(sources)]
            before = progress.total_written()
            try:
                stream = source.fetch(artifact.name, pending.path, progress.written[pending.path], self._chunk_bytes)
                for chunk in stream:
                    progress.write(chunk)
            except (StoreUnavailableError, ArtifactIntegrityError, DeltaNotFoundError, grpc.RpcError) as exc:
                # resume from where we are on the next store (one lacking the delta just makes no progress)
                last_error = exc if not isinstance(exc, DeltaNotFoundError) or last_error is None else last_error
            finally:
                progress.close()
            if progress.total_written() <= before:
                failures += 1
                if failures >= self._max_attempts:
                    break
        if progress.first_incomplete() is not None:
            if isinstance(last_error, (ArtifactIntegrityError, DeltaNotFoundError)):
                raise last_error
            raise StoreUnavailableError(
                f"fetching {artifact.name!r} stalled after {self._max_attempts} attempts on "
                f"{[s.address for s in sources]}; check the delta stores")


class _Progress:
    """Bytes written per file, with a running sha256; appends only at the expected offset."""

    def __init__(self, artifact: RemoteArtifact, partial: Path) -> None:
        self.files = {f.path: f for f in artifact.files}
        self.order = [f.path for f in artifact.files]
        self.partial = partial
        self.written: dict[str, int] = {}
        self.hashers: dict[str, hashlib._Hash] = {}
        self.done: set[str] = set()
        self._open: dict[str, object] = {}
        for f in artifact.files:
            self._resume_file(f)

    def _resume_file(self, f: RemoteFile) -> None:
        """Pick up a file left by an earlier (crashed) fetch, or start it empty."""
        target = self._target(f.path)
        hasher = hashlib.sha256()
        size = target.stat().st_size if target.exists() else 0
        if size > f.size:
            target.unlink()
            size = 0
        if size:
            with open(target, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    hasher.update(block)
        self.written[f.path], self.hashers[f.path] = size, hasher
        if size == f.size:
            try:
                self._finish(f.path)
            except ArtifactIntegrityError:  # a stale or damaged leftover: _finish removed it, fetch it again
                pass

    def _target(self, rel: str) -> Path:
        target = (self.partial / rel).resolve()
        if self.partial.resolve() not in target.parents:
            raise ArtifactIntegrityError(f"store sent a path outside the artifact: {rel!r}")
        return target

    def first_incomplete(self) -> RemoteFile | None:
        for path in self.order:
            if path not in self.done:
                return self.files[path]
        return None

    def total_written(self) -> int:
        return sum(self.written.values())

    def write(self, chunk: Chunk) -> None:
        if chunk.path not in self.files:
            raise ArtifactIntegrityError(f"store sent unknown file {chunk.path!r}")
        at = self.written[chunk.path]
        data = chunk.data
        if chunk.offset > at:
            raise StoreUnavailableError(f"store skipped bytes of {chunk.path} ({chunk.offset} > {at})")
        data = data[at - chunk.offset:]  # drop bytes we already have
        if data:
            fh = self._open.get(chunk.path)
            if fh is None:
                target = self._target(chunk.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                fh = self._open[chunk.path] = open(target, "ab")
            fh.write(data)
            self.hashers[chunk.path].update(data)
            self.written[chunk.path] = at + len(data)
        if self.written[chunk.path] >= self.files[chunk.path].size:
            self._finish(chunk.path)

    def _finish(self, path: str) -> None:
        fh = self._open.pop(path, None)
        if fh is not None:
            fh.close()
        f = self.files[path]
        if self.written[path] != f.size or self.hashers[path].hexdigest() != f.sha256:
            self._target(path).unlink(missing_ok=True)
            self.written[path], self.hashers[path] = 0, hashlib.sha256()
            raise ArtifactIntegrityError(f"{path}: size or sha256 does not match the store's listing; refetch")
        self.done.add(path)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()


def _stamp(partial: Path, artifact: RemoteArtifact) -> None:
    """Every file was hashed as it arrived: say so in a verified stamp of this boot, so loads from the cache need
    not hash them again (deltazip/artifact/stamp.py). Best effort: without a stamp (a full disk, say) loads hash
    every shard, as before."""
    try:
        write_stamp(partial, {f.path: f.sha256 for f in artifact.files if f.size})
    except OSError as exc:
        log.warning("verified_stamp_not_written", model=artifact.name, error=str(exc))


def dir_bytes(path: Path) -> int:
    """The artifact's bytes in a cache folder (its verified stamp not counted, as `fetch` counts the files)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(STAMP_FILE))


def manifest_base_identity(artifact_dir: str) -> str:
    """The base identity recorded in an artifact's manifest."""
    from deltazip.artifact import read_manifest

    return read_manifest(artifact_dir).base_identity
