"""`deltazip push | generate | models | delete | stat`: talk to a running cluster through the SDK."""

import argparse
import json
import os
import sys
from dataclasses import asdict


def _add_credentials(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--token-file and --tls-* (each defaults to its DELTAZIP_* env var through the SDK)."""
    p.add_argument("--token-file", default=os.environ.get("DELTAZIP_TOKEN_FILE"),
                   help="file holding your token (default $DELTAZIP_TOKEN_FILE, else the token in $DELTAZIP_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate of the servers: dial over TLS (default $DELTAZIP_TLS_CA)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS (default $DELTAZIP_TLS_CERT)")
    p.add_argument("--tls-key", help="its private key (default $DELTAZIP_TLS_KEY)")
    return p


def _client_kwargs(args: argparse.Namespace) -> dict:
    """token/tls for the SDK: flags win over env vars; nothing given = the SDK's env defaults."""
    from deltazip.security.tls import TlsSettings, from_env
    from deltazip.security.tokens import read_token_file

    kwargs = {}
    if args.token_file:
        kwargs["token"] = read_token_file(args.token_file, "--token-file")
    if args.tls_ca or args.tls_cert or args.tls_key:
        env = from_env()
        kwargs["tls"] = TlsSettings(ca=args.tls_ca or env.ca, cert=args.tls_cert or env.cert, key=args.tls_key or env.key,
                                    server_name=env.server_name)
    return kwargs


def register(subparsers) -> None:
    """Add the serving subcommands to the `deltazip` parser."""
    store_help = "delta store host:port (default $DELTAZIP_STORE or 127.0.0.1:50052)"
    sched_help = "scheduler host:port (default $DELTAZIP_SCHEDULER or 127.0.0.1:50051)"

    p = subparsers.add_parser("push", help="upload a compressed artifact folder to a delta store")
    p.add_argument("path", metavar="OUT", help="artifact folder written by `deltazip compress`")
    p.add_argument("--name", required=True, help="model name to serve it under")
    p.add_argument("--store", default=os.environ.get("DELTAZIP_STORE"), help=store_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model of that name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shared", action="store_true", help="visible to every tenant (needs an admin token)")
    _add_credentials(p).set_defaults(func=_push)

    p = subparsers.add_parser("generate", help="generate text with a model")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--model", required=True, help="fine-tune name or the base name (see `deltazip models`)")
    p.add_argument("--scheduler", default=os.environ.get("DELTAZIP_SCHEDULER"), help=sched_help)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--timeout-s", type=float, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the completion as JSON")
    _add_credentials(p).set_defaults(func=_generate)

    p = subparsers.add_parser("models", help="list the base model and registered fine-tunes")
    p.add_argument("--scheduler", default=os.environ.get("DELTAZIP_SCHEDULER"), help=sched_help)
    p.add_argument("--json", action="store_true")
    _add_credentials(p).set_defaults(func=_models)

    p = subparsers.add_parser("delete", help="remove a model from the delta store and the registry")
    p.add_argument("name")
    p.add_argument("--store", default=os.environ.get("DELTAZIP_STORE"), help=store_help)
    _add_credentials(p).set_defaults(func=_delete)

    p = subparsers.add_parser("stat", help="show a stored model and its files")
    p.add_argument("name")
    p.add_argument("--store", default=os.environ.get("DELTAZIP_STORE"), help=store_help)
    p.add_argument("--json", action="store_true")
    _add_credentials(p).set_defaults(func=_stat)


def _run(fn, target: str = ""):
    """Call fn(); SDK errors become one line on stderr and exit code 1."""
    from deltazip.client import DeltaZipError, UnavailableError

    try:
        return fn() or 0
    except DeltaZipError as exc:
        hint = ""
        if isinstance(exc, UnavailableError) and "connect" in exc.message and target:
            hint = f" (is the {target} running? pass --{target} HOST:PORT or set DELTAZIP_{target.upper()})"
        print(f"deltazip: {exc}{hint}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:  # a missing artifact, token file or TLS file
        print(f"deltazip: {exc}", file=sys.stderr)
        return 1


def _push(args: argparse.Namespace) -> int:
    from deltazip.client import Client

    def body():
        with Client(store=args.store, **_client_kwargs(args)) as client:
            info = client.push(args.path, args.name, overwrite=args.overwrite, progress=not args.quiet, shared=args.shared)
        print(f"pushed {info.name}: {info.artifact_bytes} bytes, {info.compression or 'unknown compression'}, "
              f"ratio {info.compression_ratio:.2f}")

    return _run(body, "store")


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed, "stop": args.stop}


def _generate(args: argparse.Namespace) -> int:
    from deltazip.client import Client

    def body():
        with Client(args.scheduler, timeout_s=args.timeout_s, **_client_kwargs(args)) as client:
            if args.stream:
                for token in client.stream(args.model, args.prompt, **_sampling(args)):
                    print(token.text, end="", flush=True)
                print()
                return
            out = client.generate(args.model, args.prompt, **_sampling(args))
        print(json.dumps(asdict(out)) if args.json else out.text)

    return _run(body, "scheduler")


def _models(args: argparse.Namespace) -> int:
    from deltazip.client import Client

    def body():
        with Client(args.scheduler, **_client_kwargs(args)) as client:
            models = client.models()
        if args.json:
            print(json.dumps([asdict(m) for m in models]))
            return
        print(f"{'NAME':<40} {'KIND':<5} {'COMPRESSION':<16} {'RATIO':>6} {'BYTES':>14}  OWNER")
        for m in models:
            kind = "base" if m.is_base else "delta"
            ratio = f"{m.compression_ratio:.2f}" if m.compression_ratio else "-"
            owner = "shared" if m.is_base else f"{m.tenant or '-'}{' (shared)' if m.shared and m.tenant else ''}"
            owner = "shared" if m.shared and not m.tenant else owner
            print(f"{m.name:<40} {kind:<5} {m.compression or '-':<16} {ratio:>6} {m.artifact_bytes or '-':>14}  {owner}")

    return _run(body, "scheduler")


def _delete(args: argparse.Namespace) -> int:
    from deltazip.client import Client

    def body():
        with Client(store=args.store, **_client_kwargs(args)) as client:
            client.delete(args.name)
        print(f"deleted {args.name}")

    return _run(body, "store")


def _stat(args: argparse.Namespace) -> int:
    from deltazip.client import Client

    def body():
        with Client(store=args.store, **_client_kwargs(args)) as client:
            info, files = client.stat(args.name)
        if args.json:
            print(json.dumps({"model": asdict(info), "files": [asdict(f) for f in files]}))
            return
        print(f"{info.name}: base {info.base or '?'} ({info.base_identity[:12] or '?'}), {info.compression or '-'}, "
              f"ratio {info.compression_ratio:.2f}, {info.artifact_bytes} bytes")
        for f in files:
            print(f"  {f.path:<40} {f.size:>14} {f.sha256}")

    return _run(body, "store")
