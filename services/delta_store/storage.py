"""Artifacts on disk: `<root>/<name>/` holds the pushed files plus the store's file index; writes are atomic.

A push is staged in `<root>/.incoming-<uuid>/` and becomes visible only by one rename; a failed push removes
its staging dir. Several store replicas may share one root.
"""

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from deltazip.rpc.errors import AlreadyExists, InvalidArgument, NotFound
from deltazip.security.principal import Ownership

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PATH_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
FILES_INDEX = ".deltazip-files.json"  # store-owned: the push header's file list, in push order
MANIFEST = "manifest.json"
STAGING_PREFIX = ".incoming-"
TRASH_PREFIX = ".trash-"
MAX_FILES = 4096


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file of an artifact as declared by the pusher and verified by the store."""

    path: str
    size: int
    sha256: str


def validate_name(name: str) -> str:
    """A model name usable as a directory name, or INVALID_ARGUMENT saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def validate_relpath(path: str) -> str:
    """A relative file path inside an artifact (no '..', no absolute or hidden parts)."""
    parts = PurePosixPath(path).parts if path else ()
    if not parts or path.startswith("/") or "\\" in path or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise InvalidArgument(
            f"invalid file path {path!r} in the artifact: use relative paths whose parts start with a letter or digit"
        )
    return "/".join(parts)


def validate_files(files: list[StoredFile]) -> list[StoredFile]:
    """The declared file list: valid unique paths, sizes, hex sha256 digests, and a manifest.json."""
    if not files or len(files) > MAX_FILES:
        raise InvalidArgument(f"the push header must list 1..{MAX_FILES} files, got {len(files)}")
    seen: set[str] = set()
    for f in files:
        validate_relpath(f.path)
        if f.path in seen:
            raise InvalidArgument(f"file {f.path!r} is listed twice in the push header")
        seen.add(f.path)
        if not re.fullmatch(r"[0-9a-f]{64}", f.sha256):
            raise InvalidArgument(f"file {f.path!r}: sha256 must be 64 lowercase hex characters")
    if MANIFEST not in seen:
        raise InvalidArgument(f"the artifact has no {MANIFEST}; push the folder written by `deltazip compress`")
    return files


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeltaStorage:
    """The store's root directory: staging, committing, listing, reading and deleting artifacts."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, name: str) -> Path:
        path = self.root / validate_name(name)
        assert path.parent == self.root
        return path

    def file_path(self, base: Path, relpath: str) -> Path:
        """`relpath` under `base`, refusing anything that resolves outside it."""
        path = (base / validate_relpath(relpath)).resolve()
        if not path.is_relative_to(base.resolve()):
            raise InvalidArgument(f"file path {relpath!r} leaves the artifact folder")
        return path

    def new_staging(self) -> Path:
        """A fresh hidden staging dir under the root (same filesystem, so commit is one rename)."""
        path = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def commit(self, staging: Path, name: str, files: list[StoredFile], overwrite: bool,
               owner: Ownership = Ownership()) -> None:
        """Write the file index (with the owner), fsync, and rename the staging dir to `<root>/<name>`."""
        index = staging / FILES_INDEX
        with open(index, "w") as f:
            json.dump({"name": name, "pushed_unix_ms": int(time.time() * 1000), "tenant": owner.tenant,
                       "shared": owner.shared, "files": [asdict(x) for x in files]}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
        target = self.model_dir(name)
        trash = None
        if target.exists():
            if not overwrite:
                raise AlreadyExists(f"model {name!r} already exists in the store; delete it first or push with overwrite")
            trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
            os.rename(target, trash)
        try:
            os.rename(staging, target)
        except OSError as exc:  # another replica committed the same name first
            raise AlreadyExists(f"model {name!r} was pushed concurrently by another client; retry") from exc
        fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        """Remove a staging dir (failed or aborted push)."""
        shutil.rmtree(staging, ignore_errors=True)

    def files(self, name: str) -> list[StoredFile]:
        """The files of a stored model in push order, or NOT_FOUND."""
        index = self.model_dir(name) / FILES_INDEX
        try:
            data = json.loads(index.read_text())
        except FileNotFoundError:
            raise NotFound(f"model {name!r} is not in the store; list models with `deltazip models`") from None
        return [StoredFile(**entry) for entry in data["files"]]

    def pushed_unix_ms(self, name: str) -> int:
        """When the model was committed."""
        return int(self._index(name).get("pushed_unix_ms", 0))

    def ownership(self, name: str) -> Ownership:
        """Who owns a stored model (NOT_FOUND if it is not stored). Indexes older than tenants are shared."""
        index = self._index(name)
        if "tenant" not in index:
            return Ownership("", True)
        return Ownership(str(index["tenant"]), bool(index.get("shared", False)))

    def _index(self, name: str) -> dict:
        try:
            return json.loads((self.model_dir(name) / FILES_INDEX).read_text())
        except FileNotFoundError:
            raise NotFound(f"model {name!r} is not in the store; list models with `deltazip models`") from None

    def names(self) -> list[str]:
        """Committed models, sorted."""
        return sorted(
            p.name for p in self.root.iterdir() if NAME_PATTERN.fullmatch(p.name) and (p / FILES_INDEX).is_file()
        )

    def delete(self, name: str) -> bool:
        """Remove a model (rename away first so readers never see a half-deleted folder)."""
        target = self.model_dir(name)
        trash = self.root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def remove_stale(self, older_than_s: float) -> int:
        """Delete staging/trash dirs left by crashed processes (any replica's) older than `older_than_s`."""
        cutoff = time.time() - older_than_s
        num_removed = 0
        for p in self.root.iterdir():
            if not p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                continue
            try:
                stale = p.stat().st_mtime < cutoff
            except FileNotFoundError:  # another replica removed it meanwhile
                continue
            if stale:
                shutil.rmtree(p, ignore_errors=True)
                num_removed += 1
        return num_removed
