"""Call metadata → Principal: the statuses and messages a caller gets for each way of getting it wrong."""

import pytest

from deltazip.rpc.auth import Authenticator, bearer_metadata
from deltazip.rpc.errors import PermissionDenied, Unauthenticated
from deltazip.security.principal import ANONYMOUS, Scope
from deltazip.security.tokens import TokenTable, add_token, parse_scopes


class FakeContext:
    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


@pytest.fixture
def auth(tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token(path, "acme", parse_scopes("read"))
    return Authenticator(TokenTable(str(path))), token


def test_no_tokens_file_means_everyone_is_anonymous():
    assert Authenticator(None).require(FakeContext(()), Scope.ADMIN, "anything") is ANONYMOUS


def test_valid_token_with_any_case_of_bearer(auth):
    authenticator, token = auth
    assert authenticator.principal(FakeContext(bearer_metadata(token))).tenant == "acme"
    assert authenticator.principal(FakeContext((("authorization", f"bearer  {token} "),))).tenant == "acme"


@pytest.mark.parametrize("metadata, message", [
    ((), "requires a token"),
    ((("authorization", "Basic dXNlcjpwYXNz"),), "Bearer <token>"),
    ((("authorization", "Bearer"),), "Bearer <token>"),
    ((("authorization", "Bearer dz_unknown"),), "not valid"),
])
def test_missing_malformed_or_unknown_tokens_are_unauthenticated(auth, metadata, message):
    authenticator, _ = auth
    with pytest.raises(Unauthenticated, match=message) as err:
        authenticator.principal(FakeContext(metadata))
    assert "dz_unknown" not in err.value.message  # a presented token is never echoed back (or logged)


def test_missing_scope_is_permission_denied_naming_it(auth):
    authenticator, token = auth
    with pytest.raises(PermissionDenied, match="pushing a model needs the 'write' scope.*has read"):
        authenticator.require(FakeContext(bearer_metadata(token)), Scope.WRITE, "pushing a model")
