"""Channel and server options: message sizes fit 1 MiB store chunks with headroom."""

MiB = 1024 * 1024
# FetchDelta/PushDelta move 1 MiB chunks; 16 MiB leaves room for a client that asks for larger ones by mistake.
MAX_MESSAGE_BYTES = 16 * MiB
CHUNK_BYTES = 1 * MiB


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for client channels (SDK, scheduler → worker, worker → store)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for every grpc.aio server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
