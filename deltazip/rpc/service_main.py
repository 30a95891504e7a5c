"""The `main()` every asyncio service shares: parse flags/env (exit 2 with the reason), configure logs, serve."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from deltazip.logs import configure_logging


def run_service(name: str, parse_config: Callable[[list[str] | None], Any], serve: Callable[[Any], Awaitable[None]],
                argv: list[str] | None = None) -> int:
    """Exit code of one service run: 2 for an invalid configuration (message on stderr), else 0 after serving."""
    try:
        config = parse_config(argv)
    except ValueError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, service=name)
    asyncio.run(serve(config))
    return 0
