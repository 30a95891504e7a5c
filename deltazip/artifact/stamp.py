"""Verified stamps: which files of an artifact folder were checked against their sha256, and how they looked then.

A worker's fetcher hashes every file as it downloads it (services/worker/fetcher.py) and then writes a stamp into
the folder before renaming it into the disk cache: each file's sha256 with its size, mtime and inode at that
moment. `load_delta` then skips hashing a shard whose stamp names the manifest's sha256 and whose size, mtime and
inode are unchanged (sha256 runs at ~1.2 GB/s on the lent H200 hosts, most of a load's time:
bench/load_delta.py). A file replaced or rewritten since (a new inode or mtime) is hashed again, as is every file
of a folder without a stamp (a store's own folders, hard links into a cache). What a stamp cannot see is the
same file's bytes changing in place with its mtime kept (disk corruption): the worker's `--reverify-disk-cache`
hashes on every load instead.

Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

STAMP_FILE = ".verified.json"
_VERSION = 1


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def write_stamp(artifact_dir: str | os.PathLike, hashes: Mapping[str, str]) -> None:
    """Record that these files (paths relative to `artifact_dir`) matched these sha256, as the files are now.
    Written to a temp file and renamed, so a reader sees the old stamp, the new one or none."""
    artifact_dir = Path(artifact_dir)
    files = {rel: {"sha256": sha, "stat": _signature((artifact_dir / rel).stat())} for rel, sha in hashes.items()}
    tmp = artifact_dir / f"{STAMP_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": _VERSION, "files": files}, sort_keys=True))
    os.replace(tmp, artifact_dir / STAMP_FILE)


def stamped(artifact_dir: str | os.PathLike) -> dict[str, str]:
    """{relative path: sha256} for the stamped files whose size, mtime, inode and device are what the stamp
    recorded; {} without a readable stamp."""
    artifact_dir = Path(artifact_dir)
    try:
        stamp = json.loads((artifact_dir / STAMP_FILE).read_text())
        if stamp.get("version") != _VERSION:
            return {}
        out = {}
        for rel, entry in stamp["files"].items():
            try:
                if _signature((artifact_dir / rel).stat()) == list(entry["stat"]):
                    out[rel] = str(entry["sha256"])
            except OSError:
                continue
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def drop_stamp(artifact_dir: str | os.PathLike) -> None:
    """Remove the folder's stamp (its files are hashed on their next load)."""
    Path(artifact_dir, STAMP_FILE).unlink(missing_ok=True)
