"""`deltazip certs` (self-signed TLS material) and `deltazip tokens add` (mint a bearer token)."""

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the security subcommands to the `deltazip` parser."""
    p = subparsers.add_parser("certs", help="generate a self-signed CA and the cluster's TLS certificates")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for ca.crt, server.crt/key, client.crt/key")
    p.add_argument("--name", action="append", default=[], help="extra DNS name or IP for the server certificate (repeatable)")
    p.add_argument("--days", type=int, default=825, help="validity in days")
    p.add_argument("--force", action="store_true", help="replace certificates already in DIR")
    p.set_defaults(func=_certs)

    p = subparsers.add_parser("tokens", help="manage the tokens file that --auth-tokens points at")
    sub = p.add_subparsers(dest="tokens_command", required=True)
    add = sub.add_parser("add", help="mint a token for a tenant; stores only its sha256, prints the token once")
    add.add_argument("file", metavar="FILE", help="tokens file (created if missing)")
    add.add_argument("--tenant", required=True)
    add.add_argument("--scopes", default="read", help="comma-separated: read, write, admin (default read)")
    add.add_argument("--name", default="", help="a label for this token (who or what uses it)")
    add.add_argument("--token-out", metavar="PATH", help="write the token to this file (0600) instead of stdout")
    add.set_defaults(func=_tokens_add)


def _certs(args: argparse.Namespace) -> int:
    from deltazip.security.certs import DEFAULT_NAMES, CertFiles, generate

    out = Path(args.out)
    if CertFiles(out).exists() and not args.force:
        print(f"{out} already holds certificates; keeping them (--force replaces them)")
        return 0
    try:
        files = generate(out, (*DEFAULT_NAMES, *args.name), args.days)
    except RuntimeError as exc:
        print(f"deltazip: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {files.ca}, {files.server_cert} (+ key), {files.client_cert} (+ key)")
    print(f"servers: --tls-cert {files.server_cert} --tls-key {files.server_key} --tls-ca {files.ca}")
    print(f"clients: DELTAZIP_TLS_CA={files.ca}")
    return 0


def _tokens_add(args: argparse.Namespace) -> int:
    import os

    from deltazip.security.tokens import add_token, parse_scopes

    try:
        token = add_token(Path(args.file), args.tenant, parse_scopes(args.scopes), args.name)
    except ValueError as exc:
        print(f"deltazip: {exc}", file=sys.stderr)
        return 1
    if args.token_out:
        fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        print(f"token for tenant {args.tenant!r} written to {args.token_out}", file=sys.stderr)
    else:
        print(token)
    return 0
