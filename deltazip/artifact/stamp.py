"""Verified stamps: which files of an artifact folder were checked against their sha256, and how they looked then.

A worker's fetcher hashes every file as it downloads it (services/worker/fetcher.py) and then writes a stamp into
the folder before renaming it into the disk cache: each file's sha256 with its size, mtime, ctime, inode and device
at that moment, and the machine's boot id. `load_delta(trust_stamp=True)` (the worker's loads) then skips the
sha256 of a shard whose stamp names the manifest's sha256 and whose stat, read on the opened file, is unchanged
(sha256 runs at ~1.2-1.4 GB/s on the lent H200 hosts, most of a load's time: bench/load_delta.py).
- A file replaced or rewritten since (a new inode, mtime or ctime; a write or a utime sets ctime, which no user can
  set back) is hashed again, as is every file of a folder without a stamp (a store's own folders, hard links into
  a cache).
- What a stamp cannot see is bytes going bad under the file system (disk corruption): the worker's
  `--reverify-disk-cache` hashes on every load instead.
- A stamp is trusted only in the boot it was written in. Bytes the kernel had not yet written to disk are lost only
  with the kernel (a crash, a power cut), and the boot after it has another id, so a stamp never vouches for a
  file whose blocks did not reach the disk, and the fetcher needs no fsync (one of 448 MB took 523 ms on the
  project's 2-core box, more than the hash it saves). Without a boot id (not Linux) no stamp is written.

Torch-free.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

STAMP_FILE = ".verified.json"
_VERSION = 1


def signature(st: os.stat_result) -> list[int]:
    """What a stamp records of a file, besides its sha256, and compares on a load."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def boot_id() -> str | None:
    """This boot of the machine (Linux: /proc/sys/kernel/random/boot_id), None where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def write_stamp(artifact_dir: str | os.PathLike, hashes: Mapping[str, str]) -> bool:
    """Record that these files (paths relative to `artifact_dir`) matched these sha256, as the files are now and in
    this boot; False (nothing written) without a boot id. Written to a temp file and renamed, so a reader sees the
    old stamp, the new one or none."""
    boot = boot_id()
    if boot is None:
        return False
    artifact_dir = Path(artifact_dir)
    files = {rel: {"sha256": sha, "stat": signature((artifact_dir / rel).stat())} for rel, sha in hashes.items()}
    tmp = artifact_dir / f"{STAMP_FILE}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_text(json.dumps({"version": _VERSION, "boot": boot, "files": files}, sort_keys=True))
        os.replace(tmp, artifact_dir / STAMP_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def stamped(artifact_dir: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """{relative path: (sha256, `signature`)} for the stamped files whose stat is what the stamp recorded now; {}
    without a readable stamp of this boot. A reader compares the signature again on the file it opens
    (`os.fstat`)."""
    artifact_dir = Path(artifact_dir)
    try:
        stamp = json.loads((artifact_dir / STAMP_FILE).read_text())
        if stamp.get("version") != _VERSION or stamp.get("boot") is None or stamp.get("boot") != boot_id():
            return {}
        out = {}
        for rel, entry in stamp["files"].items():
            try:
                recorded = [int(v) for v in entry["stat"]]
                if signature((artifact_dir / rel).stat()) == recorded:
                    out[rel] = (str(entry["sha256"]), recorded)
            except OSError:
                continue
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}


def drop_stamp(artifact_dir: str | os.PathLike) -> None:
    """Remove the folder's stamp (its files are hashed on their next load)."""
    Path(artifact_dir, STAMP_FILE).unlink(missing_ok=True)
