"""Errors the SDK raises: one subclass per gRPC status code, each carrying the code and the server's message."""

import grpc


class DeltaZipError(Exception):
    """A failed DeltaZip call; `code` is the gRPC status code, `message` says what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(DeltaZipError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(DeltaZipError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(DeltaZipError):
    code = grpc.StatusCode.ALREADY_EXISTS


class UnavailableError(DeltaZipError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(DeltaZipError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhaustedError(DeltaZipError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(DeltaZipError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class CancelledError(DeltaZipError):
    code = grpc.StatusCode.CANCELLED


class OutOfRangeError(DeltaZipError):
    code = grpc.StatusCode.OUT_OF_RANGE


class InternalError(DeltaZipError):
    code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(DeltaZipError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(DeltaZipError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE = {cls.code: cls for cls in DeltaZipError.__subclasses__()}


def error_from_rpc(exc: grpc.RpcError) -> DeltaZipError:
    """The DeltaZipError subclass for a gRPC failure, keeping its code and message."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    cls = _BY_CODE.get(code, DeltaZipError)
    return cls(details or code.name, code)
