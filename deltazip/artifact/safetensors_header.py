"""Torch-free reading of safetensors headers and checkpoint indexes (delta store and scheduler use it)."""

import json
import os
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024
# bytes per element of the safetensors dtypes (their names as the format writes them)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Header of a safetensors file -> ({name: {dtype, shape, data_offsets}}, byte offset of the data)."""
    with open(path, "rb") as f:
        header_len = header_length(f.read(8), str(path))
        header = decode_header(f.read(header_len), str(path))
    return header, 8 + header_len


def header_length(first8: bytes, where: str) -> int:
    """The header's byte length from a safetensors file's first 8 bytes (ValueError: not one)."""
    if len(first8) != 8:
        raise ValueError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", first8)
    if header_len > _MAX_HEADER_BYTES:
        raise ValueError(f"{where}: safetensors header of {header_len} bytes is implausible")
    return header_len


def decode_header(raw: bytes, where: str) -> dict:
    """{name: {dtype, shape, data_offsets}} from the header's JSON bytes, without `__metadata__`."""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{where}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{where}: a safetensors header is a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    return header


def check_layout(header: dict, data_bytes: int, where: str) -> None:
    """ValueError unless every entry has a dtype, a shape of non-negative ints and two int offsets that fit its
    dtype's size, and the entries tile the `data_bytes` after the header without gaps or overlaps (as the format
    requires; an overlap would make two tensors share bytes)."""
    spans = []
    for name, info in header.items():
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if (not isinstance(info.get("dtype") if isinstance(info, dict) else None, str)
                or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: tensor {name!r} has a malformed header entry: {info!r}"[:300])
        size = DTYPE_BYTES.get(info["dtype"])
        numel = 1
        for d in shape:
            numel *= d
        if size is not None and offsets[1] - offsets[0] != numel * size:
            raise ValueError(f"{where}: tensor {name!r}'s offsets do not fit its shape {shape} and dtype")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"{where}: tensor {name!r} starts at byte {begin} of the data, not {end} (a gap or an "
                             "overlap)")
        end = stop
    if end != data_bytes:
        raise ValueError(f"{where}: the tensors cover {end} bytes of data, the file holds {data_bytes}")


def checkpoint_shards(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name of an HF checkpoint folder to the safetensors file holding it."""
    ckpt_dir = Path(ckpt_dir)
    index_path = ckpt_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: ckpt_dir / shard for name, shard in weight_map.items()}
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors weights (expected an HF checkpoint folder)")
    mapping: dict[str, Path] = {}
    for path in files:
        for name in read_header(path)[0]:
            mapping[name] = path
    return mapping
