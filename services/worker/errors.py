"""Errors a request can fail with; each is a deltazip.rpc ServiceError carrying its gRPC status code."""

import grpc

from deltazip.artifact.errors import ArtifactError, BaseMismatchError as ArtifactBaseMismatch, CorruptArtifactError
from deltazip.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable


class DeltaNotFoundError(NotFound):
    pass


class BaseMismatchError(FailedPrecondition):
    pass


class StoreUnavailableError(Unavailable):
    pass


class ArtifactIntegrityError(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class InvalidRequestError(InvalidArgument):
    pass


def as_service_error(exc: BaseException) -> ServiceError:
    """The ServiceError a request failing with `exc` (from a fetch or a load) reports."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ArtifactBaseMismatch):
        return BaseMismatchError(str(exc))
    if isinstance(exc, CorruptArtifactError):
        return ArtifactIntegrityError(str(exc))
    if isinstance(exc, ArtifactError):
        return FailedPrecondition(f"delta artifact cannot be used: {exc}")
    return ServiceError(f"{type(exc).__name__}: {exc}")
