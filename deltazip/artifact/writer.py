"""ArtifactWriter: streams packed tensors into size-capped shards in a temp dir, publishes atomically."""

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from deltazip.artifact.atomic import make_temp_dir, publish_dir, write_file_synced
from deltazip.artifact.manifest import FILES_DIR, MANIFEST_FILE, FileEntry, Manifest, ShardEntry, TensorEntry

DEFAULT_SHARD_MAX_BYTES = 2 << 30
_ZSTD_LEVEL = 10


class ArtifactWriter:
    """Context manager: `add()` tensors and files; on a clean exit the folder appears at `out_dir` whole."""

    def __init__(
        self,
        out_dir: str | Path,
        base_identity: str,
        compression: dict,
        codec: str = "none",
        shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; remove it or pass --overwrite")
        self.base_identity, self.compression = base_identity, dict(compression)
        self.codec, self.shard_max_bytes, self.overwrite = codec, shard_max_bytes, overwrite
        self.ft_bytes_fp16 = 0
        self.ft_linear_bytes_fp16 = 0
        self._tensors: dict[str, TensorEntry] = {}
        self._shards: dict[str, ShardEntry] = {}
        self._files: dict[str, FileEntry] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.num_bytes_added = 0  # raw tensor bytes of every add() so far (the allocation's fixed cost)
        self.num_keys_added = 0
        self._tmp: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        self._tmp = make_temp_dir(self.out_dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._tmp.exists():
                shutil.rmtree(self._tmp)

    def add(self, name: str, tensors: dict[str, torch.Tensor], **entry: object) -> TensorEntry:
        """Add one delta tensor: `tensors` maps role -> tensor, `entry` holds TensorEntry's other fields."""
        keys = {role: f"{name}.{role}" for role in tensors}
        shard = self._shard_name(len(self._shards))
        record = TensorEntry(shard=shard, keys=keys, **entry)  # type: ignore[arg-type]
        for role, t in tensors.items():
            self._pending[keys[role]] = t.detach().to("cpu").contiguous()
            self._pending_bytes += t.numel() * t.element_size()
            self.num_bytes_added += t.numel() * t.element_size()
            self.num_keys_added += 1
        self._tensors[name] = record
        if self._pending_bytes >= self.shard_max_bytes:
            self._flush_shard()
        return record

    def add_file(self, rel_name: str, src: str | Path) -> None:
        """Copy a small non-weight file of the fine-tune (config, tokenizer) into files/."""
        assert self._tmp is not None
        data = Path(src).read_bytes()
        dest = self._tmp / FILES_DIR / rel_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_file_synced(dest, data)
        self._files[rel_name] = FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def _shard_name(self, index: int) -> str:
        return f"delta-{index + 1:05d}.safetensors" + (".zst" if self.codec == "zstd" else "")

    def _flush_shard(self) -> None:
        if not self._pending:
            return
        assert self._tmp is not None
        name = self._shard_name(len(self._shards))
        raw = save_safetensors(self._pending, metadata={"format": "deltazip-delta"})
        data = _zstd_compress(raw) if self.codec == "zstd" else raw
        write_file_synced(self._tmp / name, data)
        raw_size = len(raw) if self.codec != "none" else None
        digest = hashlib.sha256(data).hexdigest()
        self._shards[name] = ShardEntry(size=len(data), sha256=digest, codec=self.codec, raw_size=raw_size)
        self._pending, self._pending_bytes = {}, 0

    def _commit(self) -> None:
        self._flush_shard()
        assert self._tmp is not None
        manifest = Manifest(
            base_identity=self.base_identity,
            compression=self.compression,
            tensors=self._tensors,
            shards=self._shards,
            files=self._files,
            ft_bytes_fp16=self.ft_bytes_fp16,
            ft_linear_bytes_fp16=self.ft_linear_bytes_fp16,
        )
        write_file_synced(self._tmp / MANIFEST_FILE, manifest.to_json().encode())
        publish_dir(self._tmp, self.out_dir, self.overwrite)


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=-1).compress(data)
