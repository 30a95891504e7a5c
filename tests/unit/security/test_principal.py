"""Tenant rules: who sees and changes which model, as the scheduler and the store apply them."""

import pytest

from deltazip.rpc.errors import AlreadyExists, NotFound, PermissionDenied
from deltazip.security.principal import ANONYMOUS, Ownership, Principal, Scope, can_change, can_see
from services.delta_store.access import check_delete, check_push, check_visible

ACME_RW = Principal("acme", frozenset({Scope.READ, Scope.WRITE}))
ACME_R = Principal("acme", frozenset({Scope.READ}))
GLOBEX = Principal("globex", frozenset({Scope.READ, Scope.WRITE}))
ADMIN = Principal("ops", frozenset({Scope.ADMIN}))
ACME_OWNED, SHARED, NOBODY = Ownership("acme"), Ownership("ops", True), Ownership("", False)


@pytest.mark.parametrize("who, owner, sees, changes", [
    (ACME_RW, ACME_OWNED, True, True), (ACME_R, ACME_OWNED, True, False), (GLOBEX, ACME_OWNED, False, False),
    (GLOBEX, SHARED, True, False), (ADMIN, ACME_OWNED, True, True), (ACME_RW, NOBODY, False, False),
    (ANONYMOUS, ACME_OWNED, True, True),
])
def test_visibility_and_change_rules(who, owner, sees, changes):
    assert can_see(who, owner) is sees
    assert can_change(who, owner) is changes


def test_hidden_models_are_not_found_and_visible_foreign_ones_permission_denied():
    with pytest.raises(NotFound):
        check_visible(GLOBEX, "acme-ft", ACME_OWNED)
    with pytest.raises(NotFound):
        check_delete(GLOBEX, "acme-ft", ACME_OWNED)
    with pytest.raises(PermissionDenied, match="owner or an admin"):
        check_delete(GLOBEX, "shared-ft", SHARED)
    check_delete(ADMIN, "acme-ft", ACME_OWNED)


def test_push_rules():
    assert check_push(ACME_RW, "new", None, False, False) == Ownership("acme", False)
    assert check_push(ANONYMOUS, "new", None, False, False) == Ownership("", True)  # auth off: shared by all
    with pytest.raises(PermissionDenied, match="admin"):
        check_push(ACME_RW, "new", None, False, True)
    assert check_push(ADMIN, "new", None, False, True) == Ownership("ops", True)
    with pytest.raises(AlreadyExists, match="taken"):
        check_push(GLOBEX, "acme-ft", ACME_OWNED, True, False)
    with pytest.raises(AlreadyExists, match="--overwrite"):
        check_push(ACME_RW, "acme-ft", ACME_OWNED, False, False)
    assert check_push(ACME_RW, "acme-ft", ACME_OWNED, True, False) == Ownership("acme", False)
    with pytest.raises(PermissionDenied):
        check_push(GLOBEX, "shared-ft", SHARED, True, False)
    assert check_push(ADMIN, "acme-ft", ACME_OWNED, True, False) == Ownership("acme", False)  # owner kept
