"""DeltaZip SDK: `Client` / `AsyncClient` talk to a scheduler (generation) and a delta store (artifacts)."""

from deltazip.client.async_client import AsyncClient
from deltazip.client.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    DeltaZipError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from deltazip.client.sync_client import Client
from deltazip.client.types import ArtifactFile, ChatMessage, Completion, ModelInfo, Token, Usage
from deltazip.security.tls import TlsSettings

__all__ = [
    "AlreadyExistsError", "ArtifactFile", "AsyncClient", "CancelledError", "ChatMessage", "Client", "Completion",
    "DeadlineExceededError", "DeltaZipError", "FailedPreconditionError", "InternalError", "InvalidArgumentError",
    "ModelInfo", "NotFoundError", "OutOfRangeError", "PermissionDeniedError", "ResourceExhaustedError", "TlsSettings",
    "Token", "UnauthenticatedError", "UnavailableError", "Usage",
]
