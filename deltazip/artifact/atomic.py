"""Atomic folder publication: build in a temp dir beside the target, fsync, rename; failures leave nothing."""

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory's entries (new names, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes and fsync them (the folder is published by rename later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_temp_dir(target: Path) -> Path:
    """A fresh hidden temp dir next to `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temp dir onto `target`; an existing target is replaced only with `overwrite`."""
    fsync_dir(tmp)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; remove it or pass --overwrite")
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        os.rename(tmp, target)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)
