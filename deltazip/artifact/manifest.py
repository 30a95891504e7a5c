"""The artifact manifest: format version, base identity, per-tensor entries, per-shard sha256 (torch-free)."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltazip.artifact.errors import ArtifactError

FORMAT_NAME = "deltazip-delta"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FILES_DIR = "files"  # non-weight files of the fine-tune (config, tokenizer, chat template)

# kind -> safetensors roles it stores.
KIND_ROLES = {
    "sparse24": ("qweight", "meta", "scales", "zeros"),
    "quant": ("qweight", "scales", "zeros"),
    "dense": ("delta",),
}
SHARD_CODECS = ("none", "zstd")


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One delta tensor: kind, dense shape, quantization parameters and where its parts live."""

    kind: str  # sparse24 | quant | dense
    shape: tuple[int, ...]  # dense shape of the delta, [N, K] for linears
    dtype: str  # storage dtype of the fine-tuned tensor (restore writes this)
    shard: str  # shard file name
    keys: dict[str, str]  # role (qweight/meta/scales/zeros/delta) -> safetensors key
    bits: int | None = None
    group_size: int | None = None  # in dense columns; None = one group per row
    sym: bool | None = None
    rel_error: float | None = None  # ||D_hat - D||_F / ||D||_F measured at compress time
    out_rel_error: float | None = None  # ||X (D_hat - D)^T|| / ||X D^T|| on the calibration inputs
    absolute: bool | None = None  # baselines only: the parts encode W_ft itself, not the delta

    def __post_init__(self) -> None:
        if self.kind not in KIND_ROLES:
            raise ArtifactError(f"unknown tensor kind {self.kind!r}; valid kinds: {sorted(KIND_ROLES)}")
        missing = [r for r in KIND_ROLES[self.kind] if r not in self.keys and r != "zeros"]
        if missing:
            raise ArtifactError(f"tensor entry of kind {self.kind} lacks keys {missing}")
        if self.kind != "dense" and (self.bits is None or self.sym is None or len(self.shape) != 2):
            raise ArtifactError(f"quantized entry needs bits, sym and a 2-D shape, got {self}")


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One stored shard file: its byte size and sha256 on disk, and its lossless codec."""

    size: int
    sha256: str
    codec: str = "none"
    raw_size: int | None = None  # size of the safetensors bytes before the codec

    def __post_init__(self) -> None:
        if self.codec not in SHARD_CODECS:
            raise ArtifactError(f"unknown shard codec {self.codec!r}; valid codecs: {SHARD_CODECS}")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A non-weight file copied from the fine-tune (under files/)."""

    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything needed to verify, inspect and load a delta artifact."""

    base_identity: str
    compression: dict  # method, bits, sparsity, group_size, sym, damp, nsamples, seq_len, calib, lossless
    tensors: dict[str, TensorEntry]  # HF tensor name -> entry; tensors whose delta is exactly zero are absent
    shards: dict[str, ShardEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    ft_bytes_fp16: int = 0  # 2 bytes per parameter of the whole fine-tune (the ratio's numerator)
    ft_linear_bytes_fp16: int = 0  # the same for the linear layers that were compressed
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = "deltazip"

    def to_json(self) -> str:
        """Manifest as indented JSON, tensors in sorted order."""
        data = asdict(self)
        data["tensors"] = {k: _drop_none(v) for k, v in sorted(data["tensors"].items())}
        data["shards"] = {k: _drop_none(v) for k, v in sorted(data["shards"].items())}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parse and validate; unknown format or a newer version is refused."""
        data = json.loads(text)
        if data.get("format") != FORMAT_NAME:
            raise ArtifactError(f"not a DeltaZip delta artifact (format {data.get('format')!r}, want {FORMAT_NAME!r})")
        if int(data.get("format_version", -1)) > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {data['format_version']} is newer than this deltazip reads "
                f"({FORMAT_VERSION}); upgrade deltazip"
            )
        tensors = {k: TensorEntry(**{**v, "shape": tuple(v["shape"])}) for k, v in data.pop("tensors").items()}
        shards = {k: ShardEntry(**v) for k, v in data.pop("shards").items()}
        files = {k: FileEntry(**v) for k, v in data.pop("files", {}).items()}
        return cls(tensors=tensors, shards=shards, files=files, **data)


def read_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` of an artifact folder."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.exists():
        raise ArtifactError(f"{artifact_dir}: no {MANIFEST_FILE}; is this a delta artifact made by `deltazip compress`?")
    try:
        return Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # bad JSON or UTF-8, wrong types, missing keys
        raise ArtifactError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
