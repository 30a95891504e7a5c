"""Default service addresses: explicit argument, else DELTAZIP_SCHEDULER / DELTAZIP_STORE, else localhost."""

import os

DEFAULT_SCHEDULER = "127.0.0.1:50051"
DEFAULT_STORE = "127.0.0.1:50052"


def scheduler_address(address: str | None) -> str:
    return address or os.environ.get("DELTAZIP_SCHEDULER") or DEFAULT_SCHEDULER


def store_address(address: str | None) -> str:
    return address or os.environ.get("DELTAZIP_STORE") or DEFAULT_STORE
