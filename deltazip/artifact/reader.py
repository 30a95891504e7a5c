"""load_delta: verified artifact folder -> {HF tensor name: DeltaTensor} on a device."""

import ctypes
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.artifact.errors import ArtifactError, CorruptArtifactError
from deltazip.artifact.manifest import Manifest, ShardEntry, read_manifest
from deltazip.artifact.verify import check_base, verify


def load_delta(
    artifact_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    base_dir: str | os.PathLike | None = None,
    names: set[str] | None = None,
    check: bool = True,
) -> dict[str, DeltaTensor]:
    """Load (a subset of) the artifact's tensors; every shard read is checked against its sha256."""
    artifact_dir = Path(artifact_dir)
    # Shards are checked as they are read (one pass over their bytes); files and the tensor index here.
    manifest = verify(artifact_dir, shards=False) if check else read_manifest(artifact_dir)
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
    out: dict[str, DeltaTensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        # the whole shard wanted: its tensors stay views of the bytes read (no copy); a subset is copied out, so the
        # rest of the shard is not kept alive
        whole = names is None or set(shard_names) == set(_names_in(manifest, shard))
        tensors = read_shard(artifact_dir, shard, manifest.shards[shard], check)
        for name in shard_names:
            delta = _delta_tensor(name, manifest, tensors)
            out[name] = delta.to(device) if whole else _copied(delta, device)
    return out


def _names_in(manifest: Manifest, shard: str) -> list[str]:
    return [n for n, e in manifest.tensors.items() if e.shard == shard]


def _copied(delta: DeltaTensor, device) -> DeltaTensor:
    """delta on `device`, its CPU parts copied out of the shard's buffer."""
    moved = delta.to(device)
    for role in ("qweight", "meta", "scales", "zeros", "delta"):
        t = getattr(moved, role, None)
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            setattr(moved, role, t.clone())
    return moved


_READ_CHUNK = 16 << 20  # bytes read at a time; the sha256 of one chunk runs (GIL released) while the next is read

# safetensors dtype names -> torch dtypes (what our artifacts and checkpoints hold); others go through safetensors
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_shard(artifact_dir: Path, shard: str, entry: ShardEntry, check: bool = True) -> dict[str, torch.Tensor]:
    """Read one shard into CPU tensors, refusing bytes that do not match the manifest. The bytes are read once,
    into one buffer, hashed as they arrive, and the tensors are views of that buffer: no copy of the shard after
    the read (reading the file whole, hashing it, then safetensors' loader took 1.7-2.5x as long: bench/load_delta.py).
    Not read into page-locked memory: CUDA's host allocator rounds each block up to a power of two, so one
    shard-sized block could cost up to 2x its bytes (the worker pins each tensor, services/worker/tier_io.py)."""
    path = artifact_dir / shard
    size = path.stat().st_size
    if check and size != entry.size:
        raise _corrupt(path)
    buf = _read_into_buffer(path, size, entry.sha256 if check else None)
    if entry.codec == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(_as_bytes(buf), max_output_size=entry.raw_size or 0)
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return _safetensors_views(buf, path)


def _corrupt(path: Path) -> CorruptArtifactError:
    return CorruptArtifactError(f"shard {path} does not match its size/sha256 in the manifest; re-fetch it")


def _read_into_buffer(path: Path, size: int, sha256: str | None) -> torch.Tensor:
    """The file's `size` bytes as a uint8 tensor, checked against `sha256` (None: unchecked)."""
    buf = torch.empty(size, dtype=torch.uint8)  # not zeroed: the read fills it
    view = memoryview((ctypes.c_ubyte * size).from_address(buf.data_ptr())).cast("B") if size else memoryview(b"")
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1) as hasher:
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
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _corrupt(path)
    return buf


def _as_bytes(buf: torch.Tensor) -> bytes:
    return bytes(memoryview((ctypes.c_ubyte * buf.numel()).from_address(buf.data_ptr()))) if buf.numel() else b""


def _safetensors_views(buf: torch.Tensor, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes `buf` as views of it (a tensor whose offset is not aligned to its element
    size, or of a dtype not in _DTYPES, is copied out)."""
    size = buf.numel()
    if size < 8:
        raise CorruptArtifactError(f"shard {path} is too short for a safetensors header")
    head = int.from_bytes(_as_bytes(buf[:8]), "little")
    if 8 + head > size:
        raise CorruptArtifactError(f"shard {path}: its safetensors header runs past the file's end")
    try:
        header = json.loads(_as_bytes(buf[8:8 + head]))
    except ValueError as exc:
        raise CorruptArtifactError(f"shard {path}: unreadable safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    if any(info.get("dtype") not in _DTYPES for info in header.values()):
        return load_safetensors(_as_bytes(buf))  # a dtype we do not map: the library's copy
    start, out = 8 + head, {}
    for name, info in header.items():
        dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
        begin, end = info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= size - start or end - begin != numel * itemsize:
            raise CorruptArtifactError(f"shard {path}: tensor {name}'s offsets do not fit its shape and the file")
        raw = buf[start + begin:start + end]
        if (start + begin) % itemsize:
            raw = raw.clone()  # unaligned for its dtype: a copy of its own
        out[name] = raw.view(dtype).reshape(shape)
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
