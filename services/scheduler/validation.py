"""Checking a GenerateRequest before any routing: every message says which field to fix and how."""

import math
import re
import uuid
from dataclasses import dataclass

from deltazip.rpc.errors import InvalidArgument
from deltazip.v1 import common_pb2, scheduler_pb2

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class GenerateJob:
    """A validated request: what the relay needs."""

    request_id: str
    model: str
    request: scheduler_pb2.GenerateRequest


def validate_generate(request: scheduler_pb2.GenerateRequest, max_tokens_limit: int) -> GenerateJob:
    """The job for a valid request, or INVALID_ARGUMENT."""
    if not request.model:
        raise InvalidArgument("model is empty; name a model (list them with `deltazip models`)")
    which = request.WhichOneof("input")
    if which == "messages":
        _validate_messages(request.messages)
    elif not request.prompt:
        raise InvalidArgument("prompt is empty; send a non-empty prompt or chat messages")
    validate_sampling(request.sampling, max_tokens_limit)
    request_id = request.request_id or uuid.uuid4().hex
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument("request_id must be 1-128 characters from A-Z a-z 0-9 . _ : -")
    return GenerateJob(request_id, request.model, request)


def validate_sampling(p: common_pb2.SamplingParams, max_tokens_limit: int) -> None:
    """Ranges of every sampling field (unset optional fields take the server defaults)."""
    if p.max_tokens > max_tokens_limit:
        raise InvalidArgument(f"max_tokens={p.max_tokens} exceeds this scheduler's limit {max_tokens_limit}; ask for fewer")
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= MAX_TEMPERATURE):
        raise InvalidArgument(f"temperature={p.temperature:g} is out of range: use 0 (greedy) to {MAX_TEMPERATURE:g}")
    if p.HasField("top_p") and not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidArgument(f"top_p={p.top_p:g} is out of range: use a value in (0, 1]")
    if p.max_tokens and p.min_tokens > p.max_tokens:
        raise InvalidArgument(f"min_tokens={p.min_tokens} is larger than max_tokens={p.max_tokens}")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(f"{len(p.stop)} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed")
    for stop in p.stop:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop sequences must be 1-{MAX_STOP_CHARS} characters long")


def _validate_messages(messages) -> None:
    if not messages.messages:
        raise InvalidArgument("messages is empty; send at least one chat message")
    for i, m in enumerate(messages.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role={m.role!r}: use one of {', '.join(CHAT_ROLES)}")
