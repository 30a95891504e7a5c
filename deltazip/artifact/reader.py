"""load_delta: verified artifact folder -> {HF tensor name: DeltaTensor} on a device."""

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from deltazip.artifact.delta_tensor import PARTS, DeltaTensor, cpu_parts
from deltazip.artifact.errors import ArtifactError, CorruptArtifactError
from deltazip.artifact.manifest import Manifest, ShardEntry, read_manifest
from deltazip.artifact.safetensors_header import check_layout, decode_header, header_length
from deltazip.artifact.stamp import signature, stamped
from deltazip.artifact.verify import check_base, verify


def load_delta(
    artifact_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    base_dir: str | os.PathLike | None = None,
    names: set[str] | None = None,
    check: bool = True,
    trust_stamp: bool = False,
    buffer: Callable[[int], torch.Tensor] | None = None,
) -> dict[str, DeltaTensor]:
    """Load (a subset of) the artifact's tensors; every shard read is checked against its size and sha256, the
    sha256 taken on the read unless `trust_stamp` and the folder's verified stamp vouches for the shard as the file
    opened is (deltazip/artifact/stamp.py: a worker's own disk cache). buffer: where a shard's bytes go, a callable
    size -> uint8 CPU tensor of that many bytes (default: a new one; `ReadBuffers.lease` for reused ones); the
    tensors are views of it."""
    artifact_dir = Path(artifact_dir)
    # Shards are checked as they are read (one pass over their bytes); files and the tensor index here.
    manifest = verify(artifact_dir, shards=False) if check else read_manifest(artifact_dir)
    vouched = stamped(artifact_dir) if check and trust_stamp else {}
    if base_dir is not None:
        check_base(manifest, base_dir)
    wanted = {n: e for n, e in manifest.tensors.items() if names is None or n in names}
    if any(e.absolute for e in wanted.values()):
        raise ArtifactError(
            f"{artifact_dir} stores compressed fine-tuned weights (a baseline), not a delta; "
            "use `deltazip restore` to evaluate it, it cannot be served as a delta"
        )
    by_shard: dict[str, list[str]] = {}
    for name, entry in wanted.items():
        by_shard.setdefault(entry.shard, []).append(name)
    per_shard = Counter(e.shard for e in manifest.tensors.values())
    out: dict[str, DeltaTensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        entry = manifest.shards[shard]
        stamp = vouched.get(shard)
        tensors = read_shard(artifact_dir, shard, entry, check, buffer=buffer,
                             vouched=stamp[1] if stamp is not None and stamp[0] == entry.sha256 else None)
        whole = len(shard_names) == per_shard[shard]
        for name in shard_names:
            delta = _delta_tensor(name, manifest, tensors).to(device)
            # the whole shard wanted: its tensors stay views of the bytes read (no copy); a subset is copied out,
            # so the rest of the shard is not kept alive
            out[name] = delta if whole else compact(delta)
    return out


def compact(delta):
    """delta (a DeltaTensor, a tensor, or an object with DeltaTensor's parts) with each CPU part that is a view into
    a larger buffer (read_shard's) copied out on its own, so keeping the part does not keep the rest of the shard
    alive."""
    if isinstance(delta, torch.Tensor):
        return delta.clone() if _views_more(delta) else delta
    for role in PARTS:
        t = getattr(delta, role, None)
        if isinstance(t, torch.Tensor) and _views_more(t):
            setattr(delta, role, t.clone())
    return delta


def _views_more(t: torch.Tensor) -> bool:
    """Whether a CPU tensor views a buffer larger than its own bytes."""
    return t.device.type == "cpu" and t.untyped_storage().nbytes() > t.numel() * t.element_size()


_READ_CHUNK = 16 << 20  # bytes read at a time; the sha256 of one chunk runs (GIL released) while the next is read

# safetensors dtype names -> torch dtypes (what our artifacts and checkpoints hold); others go through safetensors
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_shard(artifact_dir: Path, shard: str, entry: ShardEntry, check: bool = True,
               buffer: Callable[[int], torch.Tensor] | None = None,
               vouched: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Read one shard into CPU tensors, refusing bytes that do not match the manifest (check=False: unchecked).
    vouched: the stat signature a verified stamp recorded with the manifest's sha256 (deltazip/artifact/stamp.py):
    when the opened file still has it, its size is checked and its sha256 not taken. The bytes are read once,
    into one buffer, hashed as they arrive, and the tensors are views of that buffer: no copy of the shard after
    the read (reading the file whole, hashing it, then safetensors' loader took 1.7-2.5x as long: bench/load_delta.py).
    Not read into page-locked memory: CUDA's host allocator rounds each block up to a power of two, so one
    shard-sized block could cost up to 2x its bytes (the worker pins each tensor, services/worker/tier_io.py)."""
    path = artifact_dir / shard
    size = path.stat().st_size
    if check and size != entry.size:
        raise _corrupt(path)
    new = buffer or _new_buffer
    buf = _read_into_buffer(path, size, entry.sha256 if check else None, new, vouched)
    if entry.codec == "zstd":
        buf = _decompressed(buf, entry, path, new)
    return _safetensors_views(buf, path)


def _decompressed(buf: torch.Tensor, entry: ShardEntry, path: Path,
                  new: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The zstd shard's safetensors bytes: streamed into a buffer of `raw_size` bytes where the manifest records
    it (no copy of either side), else decompressed whole and copied once."""
    import zstandard

    try:
        if entry.raw_size is None:
            raw = zstandard.ZstdDecompressor().decompress(_view(buf))
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out = new(entry.raw_size)
        view, done = _view(out), 0
        with zstandard.ZstdDecompressor().stream_reader(_view(buf)) as reader:
            while done < entry.raw_size and (n := reader.readinto(view[done:])):
                done += n
            if done != entry.raw_size or reader.read(1):
                raise CorruptArtifactError(f"shard {path} does not decompress to its {entry.raw_size} bytes")
        return out
    except zstandard.ZstdError as exc:
        raise CorruptArtifactError(f"shard {path} does not decompress ({exc}); re-fetch it") from exc


def _corrupt(path: Path) -> CorruptArtifactError:
    return CorruptArtifactError(f"shard {path} does not match its size/sha256 in the manifest; re-fetch it")


def _new_buffer(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8)  # not zeroed: the read fills it


def _read_into_buffer(path: Path, size: int, sha256: str | None, new: Callable[[int], torch.Tensor] = _new_buffer,
                      vouched: list[int] | None = None) -> torch.Tensor:
    """The file's `size` bytes as a uint8 tensor from `new(size)`, checked against `sha256` (None: unchecked) unless
    the opened file's stat is `vouched` (a verified stamp's `signature`: its sha256 was taken when it was written)."""
    buf = new(size)
    view = _view(buf)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as hasher:
        trusted = vouched is not None and signature(os.fstat(f.fileno())) == vouched
        if trusted:
            sha256 = None  # the file the stamp vouches for, the one being read
        hashing, done = None, 0
        while done < size:
            n = f.readinto(view[done:done + _READ_CHUNK])
            if not n:  # the file shrank since its size was read
                raise _corrupt(path)
            if sha256 is not None:
                if hashing is not None:
                    hashing.result()
                hashing = hasher.submit(digest.update, view[done:done + n])
            done += n
        if hashing is not None:
            hashing.result()
        if f.read(1):  # it grew
            raise _corrupt(path)
        if trusted and signature(os.fstat(f.fileno())) != vouched:  # written to while it was read, unhashed
            raise _corrupt(path)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _corrupt(path)
    return buf


def _view(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU uint8 tensor (the tensor must outlive it)."""
    return memoryview(buf.numpy()).cast("B") if buf.numel() else memoryview(bytearray())


def _safetensors_views(buf: torch.Tensor, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes `buf` as views of it (a tensor whose offset is not aligned to its element
    size, or of a dtype not in _DTYPES, is copied out); a malformed header is a CorruptArtifactError."""
    view, where = _view(buf), f"shard {path}"
    try:
        head = header_length(bytes(view[:8]), where)
        if 8 + head > len(view):
            raise ValueError(f"{where}: its safetensors header runs past the file's end")
        header = decode_header(bytes(view[8:8 + head]), where)
        check_layout(header, len(view) - 8 - head, where)
    except ValueError as exc:
        raise CorruptArtifactError(str(exc)) from exc
    if any(info["dtype"] not in _DTYPES for info in header.values()):
        return load_safetensors(bytes(view))  # a dtype we do not map: the library's copy
    start, out = 8 + head, {}
    for name, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = buf[start + begin:start + end]
        if (start + begin) % raw.new_empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # unaligned for its dtype: a copy of its own
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out


def _delta_tensor(name: str, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> DeltaTensor:
    entry = manifest.tensors[name]
    parts = {}
    for role, key in entry.keys.items():
        if key not in tensors:
            raise CorruptArtifactError(f"shard {entry.shard} lacks tensor {key} listed in the manifest")
        parts[role] = tensors[key]
    return DeltaTensor(
        name=name,
        kind=entry.kind,
        shape=tuple(entry.shape),
        bits=entry.bits,
        group_size=entry.group_size,
        sym=entry.sym,
        **parts,
    )


class ReadBuffers:
    """Shard read buffers kept for the next load, for callers that copy every tensor of a load out (a CUDA worker
    pins each one, services/worker/tier_io.py) before they give its buffers back.

    A read into memory the process has written before runs several times faster than into a fresh allocation,
    whose pages the kernel faults in one by one inside its copy (session 31: 1.6-1.7 against 4.1-4.9 GB/s on an H200
    host, 1.7 against 7.0 GB/s on a 2-core box). Between loads at most `keep` buffers of at most `keep_bytes` each
    stay allocated (the largest given back), outside any tier's budget (`idle_bytes` says how much); a buffer still
    viewed by a kept tensor is never reused.

        with buffers.lease() as lease:
            tensors = load_delta(path, buffer=lease.take)
            kept = {name: copy_out(t) for name, t in tensors.items()}
            lease.done(kept.values())
    """

    def __init__(self, keep: int = 1, keep_bytes: int = 2 << 30) -> None:
        self._keep, self._keep_bytes = keep, keep_bytes
        self._idle: list[torch.Tensor] = []  # whole buffers, smallest first
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)

    @contextmanager
    def lease(self):
        """A lease: `take(size)` hands out buffers (reused or new); `done(kept)` gives back those no tensor in `kept`
        views. A lease left without `done` (an error) gives nothing back."""
        lease = _Lease(self)
        yield lease

    def _take(self, size: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._idle):
                if buf.numel() >= size:
                    return self._idle.pop(i)
        return torch.empty(size, dtype=torch.uint8)

    def _give(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            fit = [b for b in self._idle + buffers if b.numel() <= self._keep_bytes]
            self._idle = sorted(fit, key=lambda b: b.numel())[-self._keep:] if self._keep else []


class _Lease:
    def __init__(self, pool: ReadBuffers) -> None:
        self._pool = pool
        self._taken: list[torch.Tensor] = []

    def take(self, size: int) -> torch.Tensor:
        """`size` bytes (the first `size` of a buffer that may be larger)."""
        buf = self._pool._take(size)
        self._taken.append(buf)
        return buf[:size]

    def done(self, kept) -> None:
        """Give back the buffers that no CPU tensor in `kept` (tensors, or objects with DeltaTensor's parts) views."""
        viewed = {t.untyped_storage().data_ptr() for item in kept for t in cpu_parts(item)}
        free = [b for b in self._taken if b.untyped_storage().data_ptr() not in viewed]
        self._taken = []
        self._pool._give(free)
