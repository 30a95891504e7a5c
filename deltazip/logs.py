"""Structured JSON logs for every DeltaZip process, with request ids carried in contextvars."""

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

_LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(level: str = "info", service: str = "") -> None:
    """Send one JSON object per line to stderr; fields bound with `bind_request` are merged in."""
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; valid levels: {', '.join(_LEVELS)}")
    numeric = getattr(logging, level.upper())
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if service:
        processors.insert(1, _add_service(service))
    structlog.configure(
        processors=[*processors, _TRACEBACKS, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args) -> structlog.WriteLogger:
    """A logger on the sys.stderr of the moment: a stream bound once at configure time goes stale when stderr is
    replaced (a closed test capture made every later line raise ValueError). Each line is one write, newline
    included: processes sharing one log (a scheduler's --processes children) never run two lines together, as
    print's separate write of the newline did with unbuffered stderr."""
    return structlog.WriteLogger(file=sys.stderr)


# Tracebacks as dicts, without the frames' local variables (structlog's default shows them): a local may
# hold a bearer token or another secret.
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def _add_service(service: str):
    def add(_logger, _method, event_dict: dict) -> dict:
        event_dict.setdefault("service", service)
        return event_dict

    return add


def get_logger(name: str = "deltazip") -> structlog.typing.FilteringBoundLogger:
    """A logger whose lines carry `logger_name=name` plus any request-scoped fields."""
    return structlog.get_logger(logger_name=name)


def new_request_id() -> str:
    """A fresh request id (32 hex chars)."""
    return uuid.uuid4().hex


@contextmanager
def bind_request(request_id: str, **fields) -> Iterator[None]:
    """Within this block every log line carries `request_id` (and `fields`, e.g. model, worker)."""
    with structlog.contextvars.bound_contextvars(request_id=request_id, **fields):
        yield


def bind_fields(**fields) -> None:
    """Add fields to the current request's log context (e.g. the worker once routed)."""
    structlog.contextvars.bind_contextvars(**fields)
