"""Building request protos from Python arguments (sampling keywords, chat messages)."""

from collections.abc import Iterable

from deltazip.v1 import common_pb2, scheduler_pb2, worker_pb2
from deltazip.client.types import ChatMessage

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens")


def sampling_params(**sampling) -> common_pb2.SamplingParams:
    """SamplingParams from keywords; the server checks ranges, unknown keywords fail here."""
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}; valid: {', '.join(SAMPLING_KEYS)}")
    values = {k: v for k, v in sampling.items() if v is not None}
    stop = values.pop("stop", None)
    if isinstance(stop, str):
        stop = [stop]
    params = common_pb2.SamplingParams(**values)
    if stop:
        params.stop.extend(stop)
    return params


def chat_messages(messages: Iterable[ChatMessage | dict]) -> worker_pb2.ChatMessages:
    """ChatMessages from ChatMessage objects or {"role", "content"} dicts."""
    out = worker_pb2.ChatMessages()
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content)
        out.messages.add(role=role, content=content)
    return out


def generate_request(model: str, prompt: str | None, messages, request_id: str | None,
                     sampling: dict) -> scheduler_pb2.GenerateRequest:
    """A scheduler GenerateRequest with exactly one of prompt / messages."""
    if (prompt is None) == (messages is None):
        raise TypeError("pass exactly one of prompt or messages")
    request = scheduler_pb2.GenerateRequest(model=model, sampling=sampling_params(**sampling), request_id=request_id or "")
    if messages is not None:
        request.messages.CopyFrom(chat_messages(messages))
    else:
        request.prompt = prompt
    return request
