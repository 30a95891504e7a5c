"""Ownership lives in the store's file index on disk, so the registry rebuilt from disk keeps it."""

import json

from deltazip.security.principal import Ownership
from services.delta_store.catalog import describe
from services.delta_store.storage import FILES_INDEX, DeltaStorage
from tests.unit.store.test_store_storage import MANIFEST, entry
from services.delta_store.push import PushSession


def commit(storage: DeltaStorage, name: str, owner: Ownership | None) -> None:
    files = [entry("manifest.json", MANIFEST)]
    session = PushSession(storage, name, files, max_bytes=1 << 20)
    session.write("manifest.json", 0, MANIFEST)
    session.finish()
    if owner is None:
        storage.commit(session.staging, name, files, False)
    else:
        storage.commit(session.staging, name, files, False, owner)


def test_owner_is_written_and_read_back_into_the_registry_record(tmp_path):
    storage = DeltaStorage(tmp_path)
    commit(storage, "acme-ft", Ownership("acme", False))
    commit(storage, "shared-ft", Ownership("ops", True))
    assert storage.ownership("acme-ft") == Ownership("acme", False)
    record = describe(storage, "shared-ft", "s1")
    assert (record.tenant, record.shared) == ("ops", True)
    assert record.ownership() == Ownership("ops", True)


def test_artifacts_stored_before_tenants_existed_are_shared(tmp_path):
    storage = DeltaStorage(tmp_path)
    commit(storage, "old-ft", None)
    index = tmp_path / "old-ft" / FILES_INDEX
    data = json.loads(index.read_text())
    del data["tenant"], data["shared"]
    index.write_text(json.dumps(data))
    assert storage.ownership("old-ft") == Ownership("", True)
