"""The worker's store channels: its token goes only over TLS (or loopback); a refusal says what to set."""

import pytest

from deltazip.security.tls import TlsSettings
from services.worker.errors import StoreUnavailableError
from services.worker.store_client import GrpcStoreSource


def test_token_is_refused_in_plaintext_off_loopback_with_the_fix():
    source = GrpcStoreSource("10.1.2.3:50052", token="dz_secret")
    try:
        with pytest.raises(StoreUnavailableError, match="--tls-ca") as err:
            source.stat("ft")
        assert "dz_secret" not in str(err.value)
        with pytest.raises(StoreUnavailableError, match="plaintext"):
            list(source.fetch("ft", "", 0, 1 << 20))
    finally:
        source.close()


def test_token_travels_over_tls_or_loopback():
    for source in (GrpcStoreSource("127.0.0.1:50052", token="dz_secret"),
                   GrpcStoreSource("store:50052", token="dz_secret", tls=TlsSettings(system_roots=True))):
        assert source._metadata == (("authorization", "Bearer dz_secret"),) and not source._refusal
        source.close()
