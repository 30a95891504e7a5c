"""Streaming an artifact folder to a delta store: file list with sha256 first, then 1 MiB chunks."""

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deltazip.rpc.options import CHUNK_BYTES
from deltazip.v1 import delta_store_pb2


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: str  # relative, posix
    abspath: Path
    size: int
    sha256: str


def sha256_file(path: Path, block_bytes: int = 4 * CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            hasher.update(block)
    return hasher.hexdigest()


def scan_artifact(folder: str | Path) -> list[LocalFile]:
    """Every regular, non-hidden file of the artifact folder, manifest.json first, then sorted."""
    root = Path(folder)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root} has no manifest.json; push the folder written by `deltazip compress`")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    paths.sort(key=lambda p: p.relative_to(root).as_posix() != "manifest.json")
    return [LocalFile(p.relative_to(root).as_posix(), p, p.stat().st_size, sha256_file(p)) for p in paths]


def push_requests(name: str, files: list[LocalFile], overwrite: bool = False,
                  on_bytes: Callable[[int], None] | None = None,
                  shared: bool = False) -> Iterator[delta_store_pb2.PushDeltaRequest]:
    """The PushDelta request stream: header, then each file's chunks in order."""
    header = delta_store_pb2.PushHeader(name=name, overwrite=overwrite, shared=shared)
    for f in files:
        header.files.add(path=f.path, size=f.size, sha256=f.sha256)
    yield delta_store_pb2.PushDeltaRequest(header=header)
    for f in files:
        with open(f.abspath, "rb") as handle:
            offset = 0
            while data := handle.read(CHUNK_BYTES):
                yield delta_store_pb2.PushDeltaRequest(chunk=delta_store_pb2.FileChunk(path=f.path, offset=offset, data=data))
                offset += len(data)
                if on_bytes is not None:
                    on_bytes(len(data))
