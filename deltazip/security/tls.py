"""TLS settings of one process and the gRPC credentials built from them.

One settings object serves both directions: as a server a process presents `cert`/`key` (and, with
`require_client_cert`, accepts only clients whose certificate `ca` signed); as a client it verifies servers
against `ca` and presents `cert`/`key` as its client certificate (mutual TLS).
"""

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_CA, ENV_CERT, ENV_KEY, ENV_SERVER_NAME = "DELTAZIP_TLS_CA", "DELTAZIP_TLS_CERT", "DELTAZIP_TLS_KEY", "DELTAZIP_TLS_SERVER_NAME"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """PEM file paths; an empty path means "not given"."""

    ca: str = ""  # CA bundle that signs the peers' certificates ('' as a client = the system roots)
    cert: str = ""  # certificate chain this process presents
    key: str = ""  # its private key
    server_name: str = ""  # name checked in servers' certificates instead of the dialled host
    require_client_cert: bool = False  # server: refuse clients without a certificate signed by `ca`
    system_roots: bool = False  # client: TLS even without `ca`, checking servers against the system's CAs

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together: give both (DELTAZIP_TLS_CERT, DELTAZIP_TLS_KEY) or neither")
        if self.require_client_cert and not (self.ca and self.cert):
            raise ValueError("--tls-require-client-cert needs --tls-ca (to check clients) and --tls-cert/--tls-key")
        for flag, path in (("--tls-ca", self.ca), ("--tls-cert", self.cert), ("--tls-key", self.key)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path!r} is not a readable file; generate certificates with `deltazip certs -o DIR`")

    @property
    def serves_tls(self) -> bool:
        """A server with these settings listens with TLS."""
        return bool(self.cert)

    @property
    def dials_tls(self) -> bool:
        """A client with these settings dials with TLS (a CA to check servers is what turns it on)."""
        return bool(self.ca) or self.system_roots


PLAINTEXT = TlsSettings()


def from_env(env: dict[str, str] | None = None, system_roots: bool = False) -> TlsSettings:
    """Client settings from DELTAZIP_TLS_* (SDK, CLI, health probes); plaintext when no CA is set.

    DELTAZIP_TLS=1 (or `system_roots`) dials TLS against the system's CAs when no DELTAZIP_TLS_CA is given.
    """
    env = os.environ if env is None else env
    return TlsSettings(ca=env.get(ENV_CA, ""), cert=env.get(ENV_CERT, ""), key=env.get(ENV_KEY, ""),
                       server_name=env.get(ENV_SERVER_NAME, ""),
                       system_roots=system_roots or env.get("DELTAZIP_TLS", "") in ("1", "true"))


def is_loopback(address: str) -> bool:
    """True for localhost / 127.x / ::1 / unix sockets: the only places a token may travel in plaintext."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback  # a bare host such as ::1
    except ValueError:
        pass
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """TLS credentials for a server port (requires cert and key)."""
    assert tls.serves_tls
    return grpc.ssl_server_credentials([(_read(tls.key), _read(tls.cert))], root_certificates=_read(tls.ca),
                                       require_client_auth=tls.require_client_cert)


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel: verify the server with `ca`, present `cert` if given."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca), private_key=_read(tls.key),
                                        certificate_chain=_read(tls.cert))


def channel_name_options(tls: TlsSettings) -> list[tuple[str, str]]:
    """Check servers' certificates for `server_name` (e.g. scaled workers advertise container ids)."""
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
