"""One PushDelta in progress: chunks are written into a staging dir and checked against the header."""

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from deltazip.rpc.errors import InvalidArgument
from services.delta_store.storage import DeltaStorage, StoredFile, validate_files, validate_name


@dataclass(slots=True)
class _FileWriter:
    """An open destination file with its running size and hash."""

    expected: StoredFile
    handle: BinaryIO | None
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    num_bytes: int = 0


class PushSession:
    """Stage files, verify every size and sha256, then hand the staging dir to `DeltaStorage.commit`."""

    def __init__(self, storage: DeltaStorage, name: str, files: list[StoredFile], max_bytes: int):
        self.storage = storage
        self.name = validate_name(name)
        self.files = validate_files(files)
        total = sum(f.size for f in files)
        if total > max_bytes:
            raise InvalidArgument(f"artifact is {total} bytes; this store accepts at most {max_bytes} (--max-artifact-bytes)")
        self.expected = {f.path: f for f in files}
        self.staging = storage.new_staging()
        self.writers: dict[str, _FileWriter] = {}
        self.num_bytes = 0

    def write(self, path: str, offset: int, data: bytes) -> None:
        """Append one chunk; chunks of a file must arrive in order."""
        expected = self.expected.get(path)
        if expected is None:
            raise InvalidArgument(f"chunk for {path!r}, which the push header does not list")
        writer = self.writers.get(path) or self._open(expected)
        if writer.handle is None:
            raise InvalidArgument(f"chunk for {path!r} after the file was complete")
        if offset != writer.num_bytes:
            raise InvalidArgument(f"chunk for {path!r} at offset {offset}, expected {writer.num_bytes}: send chunks in order")
        if writer.num_bytes + len(data) > expected.size:
            raise InvalidArgument(f"file {path!r} has more bytes than the {expected.size} declared in the header")
        writer.handle.write(data)
        writer.hasher.update(data)
        writer.num_bytes += len(data)
        self.num_bytes += len(data)
        if writer.num_bytes == expected.size:
            self._close(writer)

    def finish(self) -> None:
        """Check every declared file arrived whole with the declared sha256."""
        for f in self.files:
            writer = self.writers.get(f.path) or self._open(f)  # empty files get no chunks
            if writer.num_bytes != f.size:
                raise InvalidArgument(f"file {f.path!r} got {writer.num_bytes} of {f.size} bytes; the push was cut short")
            self._close(writer)
            digest = writer.hasher.hexdigest()
            if digest != f.sha256:
                raise InvalidArgument(
                    f"file {f.path!r}: sha256 {digest} does not match the header's {f.sha256}; the file changed or was "
                    "corrupted in transit, push again"
                )

    def abort(self) -> None:
        """Close everything and remove the staging dir."""
        for writer in self.writers.values():
            if writer.handle is not None:
                try:
                    writer.handle.close()
                except OSError:  # e.g. flushing onto a full disk: the file is discarded anyway
                    pass
                writer.handle = None
        self.storage.discard(self.staging)

    def _open(self, expected: StoredFile) -> _FileWriter:
        path = self.storage.file_path(self.staging, expected.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = self.writers[expected.path] = _FileWriter(expected, open(path, "wb"))
        return writer

    @staticmethod
    def _close(writer: _FileWriter) -> None:
        if writer.handle is not None:
            writer.handle.flush()
            os.fsync(writer.handle.fileno())
            writer.handle.close()
            writer.handle = None
