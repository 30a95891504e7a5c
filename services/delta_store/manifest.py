"""Reading the few top-level manifest.json fields the registry needs, defensively (the format is the artifact's)."""

import json
from dataclasses import dataclass
from pathlib import Path

from deltazip.rpc.errors import InvalidArgument

MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    """What the registry records about an artifact."""

    base_identity: str = ""
    base_name: str = ""
    compression: str = ""
    compression_ratio: float = 0.0


def read_summary(path: Path) -> ManifestSummary:
    """Top-level fields of manifest.json; unknown or missing fields become empty values."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidArgument(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"manifest.json is not valid JSON ({exc}); push the folder written by `deltazip compress`") from None
    if not isinstance(data, dict):
        raise InvalidArgument("manifest.json must hold a JSON object; push the folder written by `deltazip compress`")
    base = data.get("base")
    base_identity = data.get("base_identity", "")
    base_name = ""
    if isinstance(base, dict):
        base_identity = base.get("identity", base_identity)
        base_name = base.get("name", "")
    elif isinstance(base, str):
        base_name = base
    return ManifestSummary(
        base_identity=_str(base_identity),
        base_name=_str(base_name),
        compression=describe_compression(data.get("compression")),
        compression_ratio=_ratio(data),
    )


def check_listed_files(path: Path, pushed: dict[str, tuple[int, str]]) -> None:
    """Every shard and file manifest.json lists was pushed with the size and sha256 it states, else INVALID_ARGUMENT.

    `pushed` maps each pushed path to its verified (size, sha256); a manifest that lies would only fail later,
    when a worker loads the delta, so it is refused before anything becomes visible.
    """
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(
            f"manifest.json is not valid JSON ({exc}); push the folder written by `deltazip compress`") from None
    for section, prefix in (("shards", ""), ("files", "files/")):
        entries = data.get(section) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            if not isinstance(entry, dict):
                raise InvalidArgument(f"manifest.json {section}[{name!r}] must be an object with size and sha256")
            got = pushed.get(f"{prefix}{name}")
            if got is None:
                raise InvalidArgument(f"manifest.json lists {prefix}{name} but the push does not include it; "
                                      "push the whole folder written by `deltazip compress`")
            if entry.get("size") != got[0] or entry.get("sha256") != got[1]:
                raise InvalidArgument(
                    f"manifest.json says {prefix}{name} has size {entry.get('size')!r} and sha256 "
                    f"{entry.get('sha256')!r}, but {got[0]} bytes with sha256 {got[1]} were pushed; the artifact "
                    "was changed after `deltazip compress` wrote it, compress it again")


def describe_compression(config) -> str:
    """A short label such as "4bit-2:4-g128" or "dense-fp16" from the manifest's compression entry."""
    if isinstance(config, str):
        return config
    if not isinstance(config, dict):
        return ""
    if isinstance(config.get("name"), str):
        return config["name"]
    bits, sparsity, group = config.get("bits"), config.get("sparsity"), config.get("group_size")
    if not bits or config.get("method") == "dense" or config.get("kind") == "dense":
        return f"dense-{config.get('dtype', 'fp16')}"
    parts = [f"{bits}bit"]
    if sparsity and sparsity not in ("none", "dense"):
        parts.append(str(sparsity))
    if group:
        parts.append(f"g{group}")
    return "-".join(parts)


def _ratio(data: dict) -> float:
    """Fine-tuned fp16 bytes / shard bytes (format v1 manifests), else an explicit ratio field."""
    shards = data.get("shards")
    ft_bytes = data.get("ft_bytes_fp16")
    if isinstance(shards, dict) and isinstance(ft_bytes, int) and ft_bytes > 0:
        sizes = [s.get("size") for s in shards.values() if isinstance(s, dict)]
        total = sum(x for x in sizes if isinstance(x, int) and x > 0)
        if total:
            return ft_bytes / total
    for holder in (data.get("stats"), data.get("compression"), data):
        if isinstance(holder, dict):
            for key in ("compression_ratio", "ratio"):
                value = holder.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return float(value)
    return 0.0


def _str(value) -> str:
    return value if isinstance(value, str) else ""
