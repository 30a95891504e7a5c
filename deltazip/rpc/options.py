"""Channel and server options: message sizes fit 1 MiB store chunks with headroom."""

MiB = 1024 * 1024
# FetchDelta/PushDelta move 1 MiB chunks; 16 MiB leaves room for a client that asks for larger ones by mistake.
MAX_MESSAGE_BYTES = 16 * MiB
CHUNK_BYTES = 1 * MiB
MAX_PENDING_CALLS = 20_000  # calls a server's gRPC core holds before its servicer takes them (see server_options)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for client channels (SDK, scheduler → worker, worker → store)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Options for every grpc.aio server. `reuse_port`: several processes of one service share the port
    (SO_REUSEPORT; the kernel spreads new connections over them); off, a port already taken is an error."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", int(reuse_port)),
        # Calls that arrive while the asyncio loop is busy wait in gRPC core's queue until the server takes them.
        # Past its defaults (1000 waiting), core cancels calls: 3000 concurrent streams to one aio server got 20-40%
        # CANCELLED without the servicer seeing them (2-core box), and 8 of 9600 did in the 4-GPU scale-out run.
        # Admission stays ours (a scheduler's queue limits answer RESOURCE_EXHAUSTED with advice).
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]
