"""DeltaZip errors → OpenAI's error body and the HTTP status OpenAI uses for the same failure."""

import grpc
from aiohttp import web

from deltazip.client.errors import DeltaZipError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
}


class RequestError(Exception):
    """A bad HTTP request found by the gateway itself (before any gRPC call)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def request_error_response(exc: RequestError) -> web.Response:
    return web.json_response(error_body(exc.message, "invalid_request_error", exc.param, exc.code), status=exc.status)


def status_for(exc: DeltaZipError) -> tuple[int, dict]:
    """HTTP status and error body for a failed gRPC call."""
    status, error_type = _HTTP_STATUS.get(exc.code, (500, "server_error"))
    code = {grpc.StatusCode.NOT_FOUND: "model_not_found", grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key"}.get(
        exc.code, exc.code.name.lower())
    return status, error_body(exc.message, error_type, None, code)


def rpc_error_response(exc: DeltaZipError) -> web.Response:
    status, body = status_for(exc)
    return web.json_response(body, status=status)
