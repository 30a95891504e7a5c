"""Who is calling (tenant + scopes) and what they may see and change: pure rules, no gRPC.

Visibility: a tenant sees its own models, shared models and the base; admin sees everything. A model it
cannot see is reported exactly like a missing one (NOT_FOUND), so other tenants' model names never leak.
Changing (push over, delete) needs the write scope and ownership; admin may change any model.
"""

import enum
from dataclasses import dataclass


class Scope(enum.Enum):
    READ = "read"  # list, inspect and generate with visible models
    WRITE = "write"  # push, overwrite and delete own models; prefetch
    ADMIN = "admin"  # every tenant's models; push shared models


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; `all_tenants` is true for admin tokens and for servers with auth off."""

    tenant: str
    scopes: frozenset[Scope]

    @property
    def all_tenants(self) -> bool:
        return Scope.ADMIN in self.scopes

    def has(self, scope: Scope) -> bool:
        """Admin implies read and write."""
        return scope in self.scopes or self.all_tenants


# The caller of a server without a tokens file (make demo, tests): everything allowed, owns nothing.
ANONYMOUS = Principal("", frozenset(Scope))


@dataclass(frozen=True, slots=True)
class Ownership:
    """Who a model belongs to: `tenant` ('' = nobody, e.g. pushed with auth off) and whether all may see it."""

    tenant: str = ""
    shared: bool = False


def can_see(principal: Principal, owner: Ownership) -> bool:
    """Visible models: own, shared, or any for admin."""
    return principal.all_tenants or owner.shared or (bool(owner.tenant) and owner.tenant == principal.tenant)


def can_change(principal: Principal, owner: Ownership) -> bool:
    """Push over or delete: own models with write, any with admin."""
    if principal.all_tenants:
        return True
    return principal.has(Scope.WRITE) and bool(owner.tenant) and owner.tenant == principal.tenant


def ownership_for_push(principal: Principal, shared: bool) -> Ownership:
    """A new model belongs to the pusher's tenant; with auth off (anonymous) it is shared by everyone."""
    if principal is ANONYMOUS:
        return Ownership("", True)
    return Ownership(principal.tenant, shared)
