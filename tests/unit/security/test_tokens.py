"""The tokens file: only digests stored, strict parsing with messages that say what to fix, live reload."""

import json
import os
import time

import pytest

from deltazip.security import tokens
from deltazip.security.principal import Principal, Scope
from deltazip.security.tokens import TokenTable, add_token, digest, parse_scopes, parse_tokens_file, read_token_file


def test_add_token_stores_only_the_digest_with_private_permissions(tmp_path):
    path = tmp_path / "tokens.json"
    token = add_token(path, "acme", parse_scopes("read,write"), "ci")
    second = add_token(path, "globex", parse_scopes(["read"]))
    text = path.read_text()
    assert token not in text and second not in text and digest(token) in text
    assert os.stat(path).st_mode & 0o777 == 0o600
    entries = parse_tokens_file(text)
    assert entries[digest(token)].principal == Principal("acme", frozenset({Scope.READ, Scope.WRITE}))
    assert entries[digest(second)].principal.tenant == "globex"
    assert token.startswith("dz_") and len(token) > 40 and token != second


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ('{"tokens": {}}', '"tokens"'),
    ('{"tokens": [{"sha256": "abc", "tenant": "t", "scopes": ["read"]}]}', "64 hex"),
    ('{"tokens": [{"sha256": "' + "a" * 64 + '", "tenant": "../t", "scopes": ["read"]}]}', "tenant"),
    ('{"tokens": [{"sha256": "' + "a" * 64 + '", "tenant": "t", "scopes": ["root"]}]}', "valid scopes: read, write, admin"),
    ('{"tokens": [{"sha256": "' + "a" * 64 + '", "tenant": "t", "scopes": []}]}', "no scopes"),
])
def test_malformed_files_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tokens_file(text)


def test_table_looks_up_and_reloads_on_change_keeping_the_last_good_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "tokens.json"
    first = add_token(path, "acme", parse_scopes("read"))
    table = TokenTable(str(path))
    assert table.lookup(first).tenant == "acme" and table.lookup("dz_other") is None
    time.sleep(0.01)
    second = add_token(path, "globex", parse_scopes("read"))
    assert table.lookup(second).tenant == "globex"  # added without a restart
    data = json.loads(path.read_text())
    data["tokens"] = [row for row in data["tokens"] if row["tenant"] != "acme"]
    path.write_text(json.dumps(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert table.lookup(first) is None  # revoked
    path.write_text("{broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 20_000_000))
    assert table.lookup(second).tenant == "globex"  # a broken edit keeps the last good table


def test_read_token_file(tmp_path):
    path = tmp_path / "t"
    path.write_text("dz_abc\n")
    assert read_token_file(str(path)) == "dz_abc" and read_token_file("") == ""
    path.write_text("two tokens\n")
    with pytest.raises(ValueError, match="exactly one token"):
        read_token_file(str(path), "--store-token-file")
    with pytest.raises(ValueError, match="--store-token-file"):
        read_token_file(str(tmp_path / "missing"), "--store-token-file")
