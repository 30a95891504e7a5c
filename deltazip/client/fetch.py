"""Downloading an artifact from a delta store into a local folder: resumable, sha256-checked, atomic."""

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import grpc

from deltazip.client.errors import DeltaZipError
from deltazip.v1 import delta_store_pb2

# A broken stream with these codes is resumed from the last byte received.
RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class Download:
    """An artifact being written into a staging dir next to `dest`; renamed into place when complete."""

    def __init__(self, name: str, dest: str | Path):
        self.name = name
        self.dest = Path(dest)
        if self.dest.exists():
            raise FileExistsError(f"{self.dest} already exists; remove it or choose another destination")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.dest.parent / f".{self.dest.name}.part-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.completed: list[tuple[str, int]] = []
        self.path = ""  # file being written ("" between files)
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.handle = None
        self.num_bytes = 0

    def request(self) -> delta_store_pb2.FetchDeltaRequest:
        """Where to (re)start: the partial file's next byte, else just past the last completed file."""
        if self.path:
            return delta_store_pb2.FetchDeltaRequest(name=self.name, start_path=self.path, start_offset=self.offset)
        if self.completed:
            path, size = self.completed[-1]
            return delta_store_pb2.FetchDeltaRequest(name=self.name, start_path=path, start_offset=size)
        return delta_store_pb2.FetchDeltaRequest(name=self.name)

    def add(self, chunk: delta_store_pb2.FetchDeltaChunk) -> None:
        """Write one chunk; verify size and sha256 when its file ends."""
        if self.completed and chunk.path == self.completed[-1][0]:
            return  # the empty tail chunk of the file we resumed after
        if chunk.path != self.path:
            self._open(chunk)
        if chunk.offset != self.offset:
            raise DeltaZipError(f"{chunk.path}: chunk at offset {chunk.offset}, expected {self.offset}; fetch again")
        self.handle.write(chunk.data)
        self.hasher.update(chunk.data)
        self.offset += len(chunk.data)
        self.num_bytes += len(chunk.data)
        if chunk.last_in_file:
            self._finish_file(chunk)

    def commit(self) -> Path:
        """Rename the staging dir to `dest`."""
        if self.path:
            raise DeltaZipError(f"{self.path}: the stream ended mid-file; fetch again")
        os.rename(self.staging, self.dest)
        return self.dest

    def cleanup(self) -> None:
        """Close files and remove the staging dir if it is still there."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def _open(self, chunk: delta_store_pb2.FetchDeltaChunk) -> None:
        if self.handle is not None or chunk.offset != 0:
            raise DeltaZipError(f"the store skipped part of {self.path or chunk.path}; fetch again")
        target = (self.staging / chunk.path).resolve()
        if not target.is_relative_to(self.staging.resolve()):
            raise DeltaZipError(f"the store sent a path outside the artifact: {chunk.path!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.offset, self.hasher, self.handle = chunk.path, 0, hashlib.sha256(), open(target, "wb")

    def _finish_file(self, chunk: delta_store_pb2.FetchDeltaChunk) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.handle = None
        if self.offset != chunk.file_size or self.hasher.hexdigest() != chunk.file_sha256:
            raise DeltaZipError(f"{chunk.path}: size or sha256 differs from the store's record; fetch again")
        self.completed.append((self.path, self.offset))
        self.path, self.offset = "", 0
