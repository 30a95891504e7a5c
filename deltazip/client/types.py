"""Plain results the SDK returns (no protobuf types leak to callers)."""

from dataclasses import dataclass, field

from deltazip.v1 import common_pb2, delta_store_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    queue_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Token:
    """One streamed chunk: the first token alone, then each chunk carries every token the worker gathered (up to its
    --stream-chunk-tokens, 8 by default) in order, with their text; the last one has `finish_reason` and `usage`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk
    usage: Usage | None = None
    worker_id: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    worker_id: str
    request_id: str
    model: str = ""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    is_base: bool = False
    base: str = ""
    base_identity: str = ""
    artifact_bytes: int = 0
    compression_ratio: float = 0.0
    compression: str = ""
    created_unix_ms: int = 0
    tenant: str = ""
    shared: bool = False


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(slots=True)
class CompletionBuilder:
    """Joins streamed chunks into a Completion."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    last: Token | None = None
    model: str = ""

    def add(self, token: Token) -> None:
        self.texts.append(token.text)
        self.token_ids.extend(token.token_ids)
        self.last = token

    def completion(self) -> Completion:
        last = self.last or Token("", [])
        return Completion("".join(self.texts), self.token_ids, last.finish_reason, last.usage or Usage(),
                          last.worker_id, last.request_id, self.model)


def token_from_proto(chunk: common_pb2.GenerateChunk) -> Token:
    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.ttft_ms, chunk.usage.total_ms,
                  chunk.usage.queue_ms) if chunk.HasField("usage") else None
    return Token(chunk.text, list(chunk.token_ids), _FINISH.get(chunk.finish_reason), usage, chunk.worker_id,
                 chunk.request_id)


def model_from_proto(info: common_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(info.name, info.is_base, info.base, info.base_identity, info.artifact_bytes, info.compression_ratio,
                     info.compression, info.created_unix_ms, info.tenant, info.shared)


def file_from_proto(entry: delta_store_pb2.FileEntry) -> ArtifactFile:
    return ArtifactFile(entry.path, entry.size, entry.sha256)
