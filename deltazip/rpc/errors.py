"""Domain errors that map to gRPC status codes, and the decorator that turns them into statuses."""

import contextlib
import functools
import inspect
from collections.abc import Callable

import grpc
from redis.exceptions import RedisError

from deltazip import metrics
from deltazip.logs import get_logger
from deltazip.rpc.malformed import MalformedRequest

log = get_logger("deltazip.rpc")


class ServiceError(Exception):
    """An error the caller can act on; `message` says what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


def from_rpc_error(exc: grpc.RpcError, prefix: str = "") -> ServiceError:
    """Re-raise a downstream call's status unchanged (code and message), e.g. a worker's INVALID_ARGUMENT."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return ServiceError(f"{prefix}{details or ''}", code)


def rpc_method(fn: Callable) -> Callable:
    """Wrap a grpc.aio servicer method (coroutine or async generator): ServiceError → status."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                request = _checked(request)
                # closed when this stream is (the client went away mid-write), not later by the garbage collector:
                # the method's own cleanup (a request's end bookkeeping) then runs before the stream is gone
                async with contextlib.aclosing(fn(self, request, context)) as items:
                    async for item in items:
                        yield item
                _count(name, "OK")
            except Exception as exc:  # noqa: BLE001  (only ServiceError/RedisError are translated; others re-raise)
                error = _translate(exc)
                log.info("rpc_error", method=name, code=error.code.name, message=error.message)
                _count(name, error.code.name)
                await context.abort(error.code, error.message)

        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            reply = await fn(self, _checked(request), context)
            _count(name, "OK")
            return reply
        except Exception as exc:  # noqa: BLE001  (only ServiceError/RedisError are translated; others re-raise)
            error = _translate(exc)
            log.info("rpc_error", method=name, code=error.code.name, message=error.message)
            _count(name, error.code.name)
            await context.abort(error.code, error.message)

    return unary


def _checked(request):
    """The request, or INVALID_ARGUMENT when it did not parse (a request stream is checked message by message)."""
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(request.message())
    if hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests):
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(request.message())
        yield request


def _count(qualname: str, code: str) -> None:
    """deltazip_requests_total{service, method, code}: "WorkerServicer.Generate" -> ("worker", "Generate")."""
    servicer, _, method = qualname.rpartition(".")
    service = servicer.removesuffix("Servicer").lower() or "unknown"
    metrics.REQUESTS.labels({"deltastore": "delta_store"}.get(service, service), method, code).inc()


def _translate(exc: Exception) -> ServiceError:
    """ServiceError as is; Redis outages as UNAVAILABLE; anything else is a bug and propagates."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RedisError):
        return Unavailable(f"this service cannot reach Redis ({exc}); check --redis-url and that Redis is up, then retry")
    raise exc
