"""Planning and reading a FetchDelta stream: files in push order, resumable from (path, offset)."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

from deltazip.rpc.errors import InvalidArgument, OutOfRange
from deltazip.rpc.options import CHUNK_BYTES
from services.delta_store.storage import DeltaStorage, StoredFile


@dataclass(frozen=True, slots=True)
class Chunk:
    """One FetchDeltaChunk."""

    path: str
    offset: int
    data: bytes
    file_size: int
    file_sha256: str
    last_in_file: bool


def plan(files: list[StoredFile], start_path: str, start_offset: int) -> list[tuple[StoredFile, int]]:
    """(file, first offset) for every file to send."""
    if not start_path:
        if start_offset:
            raise InvalidArgument("start_offset needs start_path: name the file to resume")
        return [(f, 0) for f in files]
    paths = [f.path for f in files]
    if start_path not in paths:
        raise InvalidArgument(f"start_path {start_path!r} is not a file of this artifact; its files: {', '.join(paths)}")
    first = paths.index(start_path)
    if start_offset > files[first].size:
        raise OutOfRange(f"start_offset {start_offset} is past the end of {start_path!r} ({files[first].size} bytes)")
    return [(f, start_offset if i == first else 0) for i, f in enumerate(files[first:], start=first)]


def open_all(storage: DeltaStorage, name: str, planned: list[tuple[StoredFile, int]]) -> list[BinaryIO]:
    """Open every file up front, so a concurrent delete or overwrite cannot tear the stream."""
    base = storage.model_dir(name)
    handles: list[BinaryIO] = []
    try:
        for f, _ in planned:
            handles.append(open(storage.file_path(base, f.path), "rb"))
    except BaseException:
        for h in handles:
            h.close()
        raise
    return handles


async def stream_chunks(
    planned: list[tuple[StoredFile, int]], handles: list[BinaryIO], chunk_bytes: int = CHUNK_BYTES
) -> AsyncIterator[Chunk]:
    """Chunks of at most `chunk_bytes`; an empty file yields one empty last chunk."""
    assert 0 < chunk_bytes <= CHUNK_BYTES
    for (f, offset), handle in zip(planned, handles):
        handle.seek(offset)
        while True:
            data = await asyncio.to_thread(handle.read, min(chunk_bytes, f.size - offset))
            last = offset + len(data) >= f.size
            if not data and not last:
                raise OSError(f"{f.path} is shorter on disk than its recorded {f.size} bytes")
            yield Chunk(f.path, offset, data, f.size, f.sha256, last)
            offset += len(data)
            if last:
                break
