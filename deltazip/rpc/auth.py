"""Bearer tokens on gRPC calls: the server side reads `authorization` metadata, the client side sends it."""

import grpc

from deltazip.rpc.errors import PermissionDenied, Unauthenticated
from deltazip.security.principal import ANONYMOUS, Principal, Scope
from deltazip.security.tokens import TokenTable

AUTHORIZATION = "authorization"
_HOW = ("send `authorization: Bearer <token>` metadata (SDK: token=...; CLI: --token-file, DELTAZIP_TOKEN_FILE or "
        "DELTAZIP_TOKEN; HTTP: an Authorization header)")


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (empty when there is none)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


class Authenticator:
    """Turns a call's metadata into a Principal; with no tokens file every caller is ANONYMOUS (auth off)."""

    def __init__(self, tokens: TokenTable | None):
        self.tokens = tokens

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller, or UNAUTHENTICATED saying what to send."""
        if self.tokens is None:
            return ANONYMOUS
        values = [v for k, v in (context.invocation_metadata() or ()) if k == AUTHORIZATION]
        if not values:
            raise Unauthenticated(f"this server requires a token: {_HOW}")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        principal = self.tokens.lookup(token.strip())
        if principal is None:
            raise Unauthenticated("the token is not valid (unknown or revoked); ask the operator for a token")
        return principal

    def require(self, context: grpc.aio.ServicerContext, scope: Scope, action: str) -> Principal:
        """The caller, who must hold `scope`; PERMISSION_DENIED names the missing scope."""
        principal = self.principal(context)
        if not principal.has(scope):
            held = ", ".join(sorted(s.value for s in principal.scopes)) or "none"
            raise PermissionDenied(f"{action} needs the {scope.value!r} scope; tenant {principal.tenant!r}'s token has {held}; "
                                   "ask the operator for a token with it")
        return principal
