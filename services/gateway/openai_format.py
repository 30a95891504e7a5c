"""OpenAI request bodies → a DeltaZip generation; DeltaZip tokens → OpenAI response and stream-chunk objects."""

import time
from dataclasses import dataclass

from deltazip.client.types import Completion, ModelInfo, Token, Usage
from services.gateway.errors import RequestError

_ROLES = ("system", "user", "assistant", "tool", "developer")
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", None: None}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One parsed /v1/completions or /v1/chat/completions body."""

    model: str
    prompt: str | None
    messages: list[dict] | None
    sampling: dict
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries usage

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def parse_completion(body: dict, default_max_tokens: int) -> GenerationRequest:
    """A /v1/completions body (one prompt string, n = 1)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (or a list of one string); token-id and batched prompts are not supported", "prompt")
    return _request(body, prompt, None, default_max_tokens)


def parse_chat(body: dict, default_max_tokens: int) -> GenerationRequest:
    """A /v1/chat/completions body; the worker renders `messages` with the model's chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(_ROLES)}", f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    return _request(body, None, out, default_max_tokens)


def _content_text(content, index: int) -> str:
    """Message content: a string, or a list of text parts joined (images are not supported)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", f"messages[{index}].content")


def _request(body: dict, prompt: str | None, messages: list[dict] | None, default_max_tokens: int) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required: a fine-tune name or the base (see GET /v1/models)", "model")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported", "n")
    for unsupported in ("logprobs", "top_logprobs", "echo", "tools", "functions"):
        if body.get(unsupported):
            raise RequestError(f"'{unsupported}' is not supported by DeltaZip", unsupported)
    if body.get("best_of") not in (None, 1):
        raise RequestError("only best_of = 1 is supported", "best_of")
    max_tokens = _number(body.get("max_completion_tokens", body.get("max_tokens")), "max_tokens", int)
    if max_tokens == 0:
        raise RequestError("'max_tokens' must be at least 1 (omit it for the default)", "max_tokens")
    sampling = {
        "max_tokens": max_tokens or default_max_tokens,
        "temperature": _number(body.get("temperature"), "temperature", float),
        "top_p": _number(body.get("top_p"), "top_p", float),
        "top_k": _number(body.get("top_k"), "top_k", int),  # extensions beyond OpenAI's fields
        "seed": _number(body.get("seed"), "seed", int),
        "min_tokens": _number(body.get("min_tokens"), "min_tokens", int),
        "ignore_eos": bool(body.get("ignore_eos", False)),
        "stop": _stop(body.get("stop")),
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    options = body.get("stream_options") or {}
    return GenerationRequest(model, prompt, messages, sampling, bool(body.get("stream", False)),
                             bool(options.get("include_usage", False)))


def _number(value, name: str, kind: type):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise RequestError(f"'{name}' must be a{'n integer' if kind is int else ' number'}, got {value!r}", name)
    if kind is int and value < 0:
        raise RequestError(f"'{name}' must be >= 0, got {value}", name)
    return kind(value)


def _stop(value) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    return stops or None


def usage_dict(usage: Usage | None) -> dict:
    usage = usage or Usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def completion_object(req: GenerationRequest, response_id: str, done: Completion) -> dict:
    """The whole (non-streamed) response."""
    finish = _FINISH.get(done.finish_reason, "stop")
    if req.is_chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                  "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": req.model,
            "choices": [choice], "usage": usage_dict(done.usage), "system_fingerprint": done.worker_id or None}


def stream_chunk(req: GenerationRequest, response_id: str, token: Token | None, first: bool) -> dict:
    """One SSE chunk for `token` (None with `first`: the chat role announcement)."""
    finish = _FINISH.get(token.finish_reason, "stop") if token else None
    text = token.text if token else ""
    if req.is_chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": req.model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, response_id: str, usage: Usage | None) -> dict:
    """The extra last chunk of stream_options.include_usage: no choices, only usage."""
    kind = "chat.completion.chunk" if req.is_chat else "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": req.model, "choices": [],
            "usage": usage_dict(usage)}


def model_object(info: ModelInfo) -> dict:
    """A /v1/models entry; `root` is the base a fine-tune was made from."""
    return {"id": info.name, "object": "model", "created": info.created_unix_ms // 1000, "owned_by": info.tenant or "deltazip",
            "root": info.base or info.name, "parent": None if info.is_base else (info.base or None),
            "compression": info.compression, "compression_ratio": info.compression_ratio}
