"""aiohttp app: OpenAI routes translated to scheduler gRPC calls through the SDK's AsyncClient."""

import json
import time
from contextlib import aclosing

from aiohttp import web

from deltazip import metrics
from deltazip.client import AsyncClient
from deltazip.client.errors import DeltaZipError
from deltazip.client.types import CompletionBuilder
from deltazip.logs import bind_request, get_logger, new_request_id
from deltazip.rpc.flags import tls_settings
from services.gateway.config import GatewayConfig
from services.gateway.errors import RequestError, error_body, request_error_response, rpc_error_response, status_for
from services.gateway.openai_format import (GenerationRequest, completion_object, model_object, parse_chat,
                                            parse_completion, stream_chunk, usage_chunk)

log = get_logger("gateway")
CLIENT_KEY = web.AppKey("client", AsyncClient)
CONFIG_KEY = web.AppKey("config", GatewayConfig)


def build_app(config: GatewayConfig) -> web.Application:
    """The HTTP app; the scheduler channel opens lazily and closes on shutdown."""
    app = web.Application(middlewares=[count_requests])
    app[CONFIG_KEY] = config
    # token="": each call carries its HTTP request's own token, never one from this process's environment
    app[CLIENT_KEY] = AsyncClient(config.scheduler, timeout_s=config.request_timeout_s, token="", tls=tls_settings(config))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{name}", get_model)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.on_cleanup.append(_close_client)
    return app


async def _close_client(app: web.Application) -> None:
    await app[CLIENT_KEY].close()


@web.middleware
async def count_requests(request: web.Request, handler):
    """deltazip_requests_total{service="gateway"} by route and HTTP status; unknown routes in OpenAI's shape."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.REQUESTS.labels("gateway", route, str(exc.status)).inc()
        return web.json_response(error_body(f"{request.method} {request.path}: {exc.reason}", "invalid_request_error"),
                                 status=exc.status)
    metrics.REQUESTS.labels("gateway", route, str(response.status)).inc()
    return response


def bearer_token(request: web.Request) -> str:
    """The token of `Authorization: Bearer <token>` ('' without one), forwarded to the scheduler as is."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")


async def list_models(request: web.Request) -> web.Response:
    try:
        infos = await request.app[CLIENT_KEY].models(token=bearer_token(request))
    except DeltaZipError as exc:
        return rpc_error_response(exc)
    return web.json_response({"object": "list", "data": [model_object(i) for i in infos]})


async def get_model(request: web.Request) -> web.Response:
    try:
        info = await request.app[CLIENT_KEY].get_model(request.match_info["name"], token=bearer_token(request))
    except DeltaZipError as exc:
        return rpc_error_response(exc)
    return web.json_response(model_object(info))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion, "cmpl")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat, "chatcmpl")


async def _generate(request: web.Request, parse, id_prefix: str) -> web.StreamResponse:
    """Parse, then answer as one JSON object or as server-sent events."""
    request_id = request.headers.get("X-Request-Id") or new_request_id()
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        req = parse(body, request.app[CONFIG_KEY].default_max_tokens)
    except json.JSONDecodeError as exc:
        return request_error_response(RequestError(f"the request body is not valid JSON: {exc}"))
    except UnicodeDecodeError as exc:
        return request_error_response(RequestError(f"the request body is not valid UTF-8 ({exc.reason} at byte "
                                                    f"{exc.start}); send UTF-8 encoded JSON"))
    except web.HTTPRequestEntityTooLarge:
        return request_error_response(RequestError(
            f"the request body is too large (over {request.client_max_size} bytes); send a shorter prompt",
            status=413))
    except RequestError as exc:
        return request_error_response(exc)
    with bind_request(request_id, model=req.model):
        log.info("http_request", path=request.path, stream=req.stream)
        tokens = request.app[CLIENT_KEY].stream(req.model, req.prompt, messages=req.messages, request_id=request_id,
                                                token=bearer_token(request), **req.sampling)
        async with aclosing(tokens):  # leaving early (client gone) cancels the gRPC stream
            return await _respond(request, req, tokens, f"{id_prefix}-{request_id}", request_id)


async def _respond(request: web.Request, req: GenerationRequest, tokens, response_id: str,
                   request_id: str) -> web.StreamResponse:
    start_s = time.monotonic()
    try:  # the first chunk before any header: errors like an unknown model still get their HTTP status
        first = await anext(tokens)
    except DeltaZipError as exc:
        log.info("http_error", code=exc.code.name, message=exc.message)
        return rpc_error_response(exc)
    except StopAsyncIteration:
        first = None
    first_s = time.monotonic()
    headers = {"X-Request-Id": request_id}
    if not req.stream:
        builder = CompletionBuilder(model=req.model)
        try:
            if first is not None:
                builder.add(first)
                async for token in tokens:
                    builder.add(token)
        except DeltaZipError as exc:
            return rpc_error_response(exc)
        done = builder.completion()
        metrics.observe_stream_timing("gateway", start_s, first_s, time.monotonic(), len(done.token_ids))
        return web.json_response(completion_object(req, response_id, done), headers=headers)
    return await _stream(request, req, first, tokens, response_id, headers, start_s, first_s)


async def _stream(request, req, first, tokens, response_id, headers, start_s, first_s) -> web.StreamResponse:
    """Server-sent events: one `data: {chunk}` per streamed chunk (one or more tokens), then the usage chunk if asked, then `data: [DONE]`."""
    response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    if req.is_chat:
        await _send(response, stream_chunk(req, response_id, None, first=True))
    last, num_tokens = first, 0
    try:
        token = first
        while token is not None:
            num_tokens += len(token.token_ids)
            if token.text or token.finish_reason:
                await _send(response, stream_chunk(req, response_id, token, first=False))
            last, token = token, await anext(tokens, None)
    except DeltaZipError as exc:  # headers are gone: the error travels as an event, as OpenAI's API does
        await _send(response, status_for(exc)[1])
    metrics.observe_stream_timing("gateway", start_s, first_s, time.monotonic(), num_tokens)
    if req.include_usage:
        await _send(response, usage_chunk(req, response_id, last.usage if last else None))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, obj: dict) -> None:
    await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
