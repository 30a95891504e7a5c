"""Errors a request can fail with, each carrying the gRPC status code the servicer returns."""

import grpc


class WorkerError(Exception):
    """Base: `code` is the gRPC status; the message tells the caller what to fix."""

    code = grpc.StatusCode.INTERNAL


class DeltaNotFoundError(WorkerError):
    code = grpc.StatusCode.NOT_FOUND


class BaseMismatchError(WorkerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StoreUnavailableError(WorkerError):
    code = grpc.StatusCode.UNAVAILABLE


class ArtifactIntegrityError(WorkerError):
    code = grpc.StatusCode.DATA_LOSS


class InvalidRequestError(WorkerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a request failing with `exc` gets."""
    if isinstance(exc, WorkerError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
