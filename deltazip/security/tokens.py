"""Bearer tokens: the tokens file (token sha256 → tenant, scopes), minting new tokens, and looking one up.

The file holds only sha256 digests, never a token itself, so reading it (or a backup of it) grants nothing:

    {"tokens": [{"sha256": "<64 hex>", "tenant": "acme", "scopes": ["read", "write"], "name": "acme-ci"}]}

`deltazip tokens add FILE --tenant acme --scopes read,write` mints a token, appends its digest and prints the
token once. Servers re-read the file when it changes (checked at most once a second), so adding or revoking
a token needs no restart.
"""

import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deltazip.security.principal import Principal, Scope

TOKEN_PREFIX = "dz_"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
RELOAD_CHECK_S = 1.0


def digest(token: str) -> str:
    """The hex sha256 a tokens file stores for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str | list[str]) -> frozenset[Scope]:
    """"read,write" or ["read", "write"] → scopes; ValueError names the valid ones."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    valid = ", ".join(s.value for s in Scope)
    if not names:
        raise ValueError(f"no scopes given; use some of: {valid}")
    try:
        return frozenset(Scope(name) for name in names)
    except ValueError:
        raise ValueError(f"unknown scope in {names}; valid scopes: {valid}") from None


@dataclass(frozen=True, slots=True)
class TokenEntry:
    sha256: str
    principal: Principal
    name: str = ""


def parse_tokens_file(text: str, source: str = "tokens file") -> dict[str, TokenEntry]:
    """Digest → entry; ValueError says which entry is wrong and how."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    rows = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f'{source} must be a JSON object {{"tokens": [...]}}')
    entries: dict[str, TokenEntry] = {}
    for i, row in enumerate(rows):
        where = f"{source}: tokens[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} must be an object with sha256, tenant and scopes")
        sha = str(row.get("sha256", "")).lower()
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"{where}.sha256 must be 64 hex characters (the token's sha256, never the token)")
        tenant = str(row.get("tenant", ""))
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"{where}.tenant {tenant!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
        scopes = parse_scopes(row.get("scopes") or [])
        if sha in entries:
            raise ValueError(f"{where} repeats a token already listed")
        entries[sha] = TokenEntry(sha, Principal(tenant, scopes), str(row.get("name", "")))
    return entries


def add_token(path: Path, tenant: str, scopes: frozenset[Scope], name: str = "") -> str:
    """Mint a token, append its digest to the file at `path` (created 0600 if missing); returns the token."""
    entries = parse_tokens_file(path.read_text(), str(path)) if path.exists() else {}
    token = new_token()
    entry = {"sha256": digest(token), "tenant": tenant, "scopes": sorted(s.value for s in scopes), "name": name}
    rows = [{"sha256": e.sha256, "tenant": e.principal.tenant, "scopes": sorted(s.value for s in e.principal.scopes),
             "name": e.name} for e in entries.values()]
    text = json.dumps({"tokens": [*rows, entry]}, indent=2) + "\n"
    parse_tokens_file(text, str(path))  # the tenant/scopes we are about to write must load back
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


class TokenTable:
    """The tokens file of a server, reloaded when it changes; a broken edit keeps the last good table."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime_ns = self.path.stat().st_mtime_ns
        self._entries = parse_tokens_file(self.path.read_text(), str(self.path))  # fail at start, not at first call
        self._checked_s = time.monotonic()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token: str) -> Principal | None:
        """Who `token` belongs to, or None."""
        self._maybe_reload()
        entry = self._entries.get(digest(token))
        return entry.principal if entry else None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_s < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked_s = now
            try:
                mtime_ns = self.path.stat().st_mtime_ns
                if mtime_ns != self._mtime_ns:
                    self._entries = parse_tokens_file(self.path.read_text(), str(self.path))
                    self._mtime_ns = mtime_ns
            except (OSError, ValueError):
                return  # keep serving with the last good table; the next check retries


def validate_tokens_file(path: str, flag: str = "--auth-tokens") -> None:
    """ValueError naming `flag` when the file is missing or malformed (config validation)."""
    if not path:
        return
    try:
        parse_tokens_file(Path(path).read_text(), path)
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be read ({exc.strerror}); create it with `deltazip tokens add`") from None
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def read_token_file(path: str, flag: str = "--token-file") -> str:
    """The token stored in a file (surrounding whitespace dropped); '' for no path; ValueError naming `flag`."""
    if not path:
        return ""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be read ({exc.strerror})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{flag} {path!r} must hold exactly one token")
    return token
