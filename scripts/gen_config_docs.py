"""Generate the configuration reference of docs/operations.md from the services' Config dataclasses and flag parsers.

    python scripts/gen_config_docs.py           # rewrite the block between the markers in docs/operations.md
    python scripts/gen_config_docs.py --check   # exit 1 if the committed doc is out of date (used by the tests)

One table per service: every Config field with its flag, env var, type, default and description. The
description is the flag's help, else the field's inline comment in config.py.
"""

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
BEGIN, END = "<!-- BEGIN CONFIG REFERENCE (scripts/gen_config_docs.py) -->", "<!-- END CONFIG REFERENCE -->"
# service -> (config module, Config class, function that builds and parses the flags)
SERVICES = {
    "gateway": ("services.gateway.config", "GatewayConfig", "parse_config"),
    "scheduler": ("services.scheduler.config", "SchedulerConfig", "parse_config"),
    "worker": ("services.worker.config", "WorkerConfig", "config_from_args"),
    "delta_store": ("services.delta_store.config", "StoreConfig", "parse_config"),
}
# descriptions for the shared flags whose help is only the env var
COMMON = {
    "log_level": "debug, info, warning, error or critical; logs are JSON lines on stderr",
    "grace_s": "seconds in-flight calls get to finish on SIGTERM",
    "redis_url": "shared cluster state",
    "host": "bind address",
}
ENV = re.compile(r"\(?(?:env )?(DELTAZIP_[A-Z0-9_]+)\)?")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def capture_parser(parse) -> argparse.ArgumentParser:
    """The ArgumentParser `parse` builds, caught at parse_args (nothing is parsed or validated)."""
    original = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = grab
    try:
        parse([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{parse.__qualname__} never built a parser")


def field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source -> {name: comment}."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if match:
            out[match.group(1)] = match.group(2).strip()
    return out


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        return f"`{value}`" if value != "" else '`""`'
    return "(generated)" if f.default_factory is not dataclasses.MISSING else "(required)"


def service_table(name: str) -> str:
    module_name, class_name, parse_name = SERVICES[name]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    actions = {a.dest: a for a in capture_parser(getattr(module, parse_name))._actions if a.option_strings}
    comments = field_comments(cls)
    rows = [f"### {name} (`python -m services.{name}`, `{class_name}`)", "",
            "| field | flag | env var | type | default | description |", "|---|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        action = actions.get(f.name)
        flag = action.option_strings[-1] if action else "-"
        help_text = (action.help or "") if action else ""
        env = ENV.search(help_text)
        env_name = env.group(1) if env else ("DELTAZIP_" + f.name.upper() if action else "-")
        description = ENV.sub("", help_text).strip(" ;,") or comments.get(f.name) or COMMON.get(f.name, "")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        rows.append(f"| `{f.name}` | `{flag}` | `{env_name}` | {kind} | {default_of(f)} | {description.replace('|', '/')} |")
    return "\n".join(rows)


def reference() -> str:
    return "\n\n".join(service_table(name) for name in SERVICES)


def render(doc: str) -> str:
    """`doc` with the block between the markers replaced by the current reference."""
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:start] + "\n\n" + reference() + "\n\n" + doc[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/operations.md is out of date")
    args = parser.parse_args(argv)
    for key in [k for k in os.environ if k.startswith("DELTAZIP_")]:
        del os.environ[key]  # defaults must not depend on this shell
    sys.path.insert(0, str(ROOT))
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        if new != doc:
            print("docs/operations.md is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
