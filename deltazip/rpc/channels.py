"""Client channels with our message-size options, and a small per-address cache of aio channels."""

import grpc

from deltazip.rpc.options import channel_options


def aio_channel(address: str) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `address` ("host:port")."""
    return grpc.aio.insecure_channel(address, options=channel_options())


def sync_channel(address: str) -> grpc.Channel:
    """An insecure blocking channel to `address` ("host:port")."""
    return grpc.insecure_channel(address, options=channel_options())


class ChannelPool:
    """One aio channel per address, reused across calls; closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The cached channel for `address`, created on first use."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address)
        return channel

    async def drop(self, address: str) -> None:
        """Close and forget the channel for `address` (e.g. the worker went away)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
