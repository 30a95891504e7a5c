"""What `deltazip inspect` reports: ratios from the bytes on disk, bits per weight, per-tensor errors (torch-free)."""

import json
import os
import struct
from pathlib import Path

from deltazip.artifact.manifest import MANIFEST_FILE, Manifest, ShardEntry, read_manifest
from deltazip.artifact.names import is_block_linear
from deltazip.artifact.safetensors_header import read_header


def summarize(artifact_dir: str | os.PathLike) -> dict:
    """Ratios (fine-tuned fp16 bytes / stored bytes), overall and for block linears, plus per-tensor rows."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    key_bytes = _stored_bytes_per_key(artifact_dir, manifest)
    shard_bytes = sum(s.size for s in manifest.shards.values())
    extra_bytes = sum(f.size for f in manifest.files.values()) + (artifact_dir / MANIFEST_FILE).stat().st_size
    rows, linear_bytes, linear_params = [], 0.0, 0
    for name, entry in sorted(manifest.tensors.items()):
        nbytes = sum(key_bytes[k] for k in entry.keys.values())
        numel = 1
        for s in entry.shape:
            numel *= s
        if is_block_linear(name, tuple(entry.shape)):
            linear_bytes += nbytes
            linear_params += numel
        rows.append({
            "name": name, "kind": entry.kind, "shape": list(entry.shape), "bits": entry.bits,
            "group_size": entry.group_size, "bytes": round(nbytes), "bits_per_weight": 8 * nbytes / numel,
            "rel_error": entry.rel_error, "out_rel_error": entry.out_rel_error,
        })  # fmt: skip
    return {
        "artifact": str(artifact_dir),
        "format_version": manifest.format_version,
        "base_identity": manifest.base_identity,
        "compression": manifest.compression,
        "ft_bytes_fp16": manifest.ft_bytes_fp16,
        "shard_bytes": shard_bytes,
        "artifact_bytes": shard_bytes + extra_bytes,
        "ratio": manifest.ft_bytes_fp16 / shard_bytes if shard_bytes else float("inf"),
        "ratio_with_files": manifest.ft_bytes_fp16 / (shard_bytes + extra_bytes),
        "linear_ft_bytes_fp16": manifest.ft_linear_bytes_fp16,
        "linear_bytes": round(linear_bytes),
        "linear_ratio": manifest.ft_linear_bytes_fp16 / linear_bytes if linear_bytes else float("inf"),
        "linear_bits_per_weight": 8 * linear_bytes / linear_params if linear_params else 0.0,
        "tensors": rows,
    }


def format_text(summary: dict) -> str:
    """Human-readable table of a summary."""
    c = summary["compression"]
    lines = [
        f"artifact  {summary['artifact']}  (format v{summary['format_version']})",
        f"base      {summary['base_identity']}",
        f"method    {c.get('method')}  bits={c.get('bits')}  sparsity={c.get('sparsity')}  "
        f"group_size={c.get('group_size')}  sym={c.get('sym')}  lossless={c.get('lossless')}",
        f"ratio     {summary['ratio']:.2f}x  ({summary['ft_bytes_fp16']:,} fp16 bytes / {summary['shard_bytes']:,} "
        f"shard bytes; {summary['ratio_with_files']:.2f}x counting manifest and files)",
        f"linears   {summary['linear_ratio']:.2f}x  {summary['linear_bits_per_weight']:.3f} bits/weight",
        *_allocation_lines(c.get("allocation")),
        "",
        f"{'tensor':<48} {'kind':<9} {'bits':>4} {'bits/w':>7} {'rel_err':>8} {'out_err':>8}",
    ]
    for r in summary["tensors"]:
        rel = f"{r['rel_error']:.4f}" if r["rel_error"] is not None else "-"
        out = f"{r['out_rel_error']:.4f}" if r["out_rel_error"] is not None else "-"
        lines.append(
            f"{r['name']:<48} {r['kind']:<9} {r['bits'] or 16:>4} {r['bits_per_weight']:>7.3f} {rel:>8} {out:>8}"
        )
    return "\n".join(lines)


def _allocation_lines(alloc: dict | None) -> list[str]:
    """Allocation-mode artifacts: the target and how many linears took each option (dropped ones have no row)."""
    if not isinstance(alloc, dict):
        return []
    counts = "  ".join(f"{k}={v}" for k, v in alloc.get("counts", {}).items())
    return [f"allocation  target {alloc.get('target_ratio')}x ({alloc.get('sensitivity')}): {counts}",
            *(f"  dropped {name}" for name in alloc.get("dropped", []))]


def _stored_bytes_per_key(artifact_dir: Path, manifest: Manifest) -> dict[str, float]:
    """Bytes each safetensors key occupies on disk (zstd shards: its raw bytes x the shard's compression)."""
    out: dict[str, float] = {}
    for name, shard in manifest.shards.items():
        header = _shard_header(artifact_dir / name, shard)
        factor = shard.size / shard.raw_size if shard.codec != "none" and shard.raw_size else 1.0
        for key, info in header.items():
            begin, end = info["data_offsets"]
            out[key] = (end - begin) * factor
    return out


def _shard_header(path: Path, shard: ShardEntry) -> dict:
    if shard.codec == "none":
        return read_header(path)[0]
    import zstandard

    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        (header_len,) = struct.unpack("<Q", _read_exact(reader, 8))
        header = json.loads(_read_exact(reader, header_len))
    header.pop("__metadata__", None)
    return header


def _read_exact(reader, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = reader.read(size - got)
        if not chunk:
            raise ValueError("zstd shard ends inside its safetensors header")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
