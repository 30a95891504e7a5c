"""Who may push, read and delete which stored model: the tenant rules applied to the store's RPCs.

A model another tenant cannot see is answered exactly like a missing one, so names never leak through
NOT_FOUND vs PERMISSION_DENIED; only a push under a taken name says the name is taken.
"""

from deltazip.rpc.errors import AlreadyExists, NotFound, PermissionDenied
from deltazip.security.principal import ANONYMOUS, Ownership, Principal, can_change, can_see, ownership_for_push


def not_in_store(name: str) -> NotFound:
    """The one NOT_FOUND for missing and invisible models alike."""
    return NotFound(f"model {name!r} is not in the store; list models with `deltazip models`")


def check_visible(principal: Principal, name: str, owner: Ownership) -> None:
    """NOT_FOUND unless `principal` may see the model."""
    if not can_see(principal, owner):
        raise not_in_store(name)


def check_push(principal: Principal, name: str, existing: Ownership | None, overwrite: bool, shared: bool) -> Ownership:
    """The owner the pushed model gets, or the status saying why this push may not happen."""
    if shared and not principal.all_tenants:
        raise PermissionDenied(f"pushing {name!r} as shared (visible to every tenant) needs the 'admin' scope; "
                               "push it without --shared to keep it to your tenant")
    owner = ownership_for_push(principal, shared)
    if existing is None:
        return owner
    if not can_see(principal, existing):
        raise AlreadyExists(f"the model name {name!r} is taken; choose another name")
    if not overwrite:
        raise AlreadyExists(
            f"model {name!r} already exists; delete it with `deltazip delete {name}` or push with --overwrite"
        )
    if not can_change(principal, existing):
        raise PermissionDenied(f"model {name!r} is shared by another tenant; only its owner or an admin can overwrite it")
    if principal.all_tenants and principal is not ANONYMOUS:  # an admin replacing a tenant's model keeps its owner
        return Ownership(existing.tenant or owner.tenant, shared)
    return owner


def check_delete(principal: Principal, name: str, owner: Ownership) -> None:
    """NOT_FOUND for invisible models, PERMISSION_DENIED for visible ones the caller does not own."""
    check_visible(principal, name, owner)
    if not can_change(principal, owner):
        raise PermissionDenied(f"model {name!r} belongs to another tenant; only its owner or an admin can delete it")
