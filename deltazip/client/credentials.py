"""What the SDK sends to prove who it is: TLS settings and the bearer token, from arguments or DELTAZIP_* env."""

import os

from deltazip.rpc.auth import bearer_metadata
from deltazip.security.tls import PLAINTEXT, TlsSettings, from_env, is_loopback
from deltazip.security.tokens import read_token_file


def client_tls(tls: TlsSettings | bool | None) -> TlsSettings:
    """None: DELTAZIP_TLS_* env (plaintext if unset); True: TLS (env CA, else system CAs); False: plaintext."""
    if isinstance(tls, TlsSettings):
        return tls
    if tls is None:
        return from_env()
    return from_env(system_roots=True) if tls else PLAINTEXT


def client_token(token: str | None) -> str:
    """None: $DELTAZIP_TOKEN, else the token in the file $DELTAZIP_TOKEN_FILE, else '' (no token)."""
    if token is not None:
        return token
    if os.environ.get("DELTAZIP_TOKEN"):
        return os.environ["DELTAZIP_TOKEN"]
    return read_token_file(os.environ.get("DELTAZIP_TOKEN_FILE", ""), "DELTAZIP_TOKEN_FILE")


def call_metadata(address: str, tls: TlsSettings, token: str) -> tuple[tuple[str, str], ...]:
    """The token as call metadata; refuses to send it in plaintext off this machine."""
    if token and not tls.dials_tls and not is_loopback(address):
        raise ValueError(f"refusing to send a token in plaintext to {address}: give the server's CA "
                         "(tls=TlsSettings(ca=...) or DELTAZIP_TLS_CA) or tls=True for a publicly trusted certificate")
    return bearer_metadata(token)
