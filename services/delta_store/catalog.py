"""What the store knows about a committed model: its registry record, built from disk."""

from deltazip.cluster.models import ModelRecord
from services.delta_store.manifest import read_summary
from services.delta_store.storage import MANIFEST, DeltaStorage, StoredFile


def describe(storage: DeltaStorage, name: str, store_id: str, files: list[StoredFile] | None = None) -> ModelRecord:
    """The registry record of a committed model (NOT_FOUND if it is not on disk)."""
    files = storage.files(name) if files is None else files
    summary = read_summary(storage.model_dir(name) / MANIFEST)
    owner = storage.ownership(name)
    return ModelRecord(
        name=name,
        base_identity=summary.base_identity,
        base=summary.base_name,
        artifact_bytes=sum(f.size for f in files),
        compression_ratio=summary.compression_ratio,
        compression=summary.compression,
        created_unix_ms=storage.pushed_unix_ms(name),
        store_id=store_id,
        tenant=owner.tenant,
        shared=owner.shared,
    )
