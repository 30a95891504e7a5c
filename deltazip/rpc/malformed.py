"""Requests whose bytes do not parse (corrupt wire format, invalid UTF-8 in a string) become INVALID_ARGUMENT.

grpc.aio answers a failing request deserializer with UNKNOWN and the exception's repr; the interceptor swaps in
a deserializer that returns a `MalformedRequest` instead, which `rpc_method` turns into INVALID_ARGUMENT.
"""

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Stands in for a request message that failed to parse."""

    method: str
    error: str

    def message(self) -> str:
        return (f"the request to {self.method} is not a valid protobuf message ({self.error}); send the message the "
                "method's .proto declares, with UTF-8 strings (the deltazip SDK does this)")


def lenient(method: str, deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """`deserializer` that returns a MalformedRequest instead of raising."""

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return MalformedRequest(method, str(exc).split(": ", 1)[-1])

    return parse


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Installs `lenient` on every method handler of the server."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=lenient(handler_call_details.method, handler.request_deserializer))
