"""Client channels with our message-size options (TLS when the settings carry a CA), and a per-address cache."""

import grpc

from deltazip.rpc.options import channel_options
from deltazip.security.tls import PLAINTEXT, TlsSettings, channel_credentials, channel_name_options


def aio_channel(address: str, tls: TlsSettings = PLAINTEXT) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` ("host:port"): TLS if `tls` has a CA, else plaintext."""
    if tls.dials_tls:
        options = channel_options() + channel_name_options(tls)
        return grpc.aio.secure_channel(address, channel_credentials(tls), options=options)
    return grpc.aio.insecure_channel(address, options=channel_options())


def sync_channel(address: str, tls: TlsSettings = PLAINTEXT) -> grpc.Channel:
    """A blocking channel to `address`: TLS if `tls` has a CA, else plaintext."""
    if tls.dials_tls:
        options = channel_options() + channel_name_options(tls)
        return grpc.secure_channel(address, channel_credentials(tls), options=options)
    return grpc.insecure_channel(address, options=channel_options())


class ChannelPool:
    """One aio channel per address, reused across calls; closed together."""

    def __init__(self, tls: TlsSettings = PLAINTEXT) -> None:
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The cached channel for `address`, created on first use."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self.tls)
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
