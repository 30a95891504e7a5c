"""TLS settings, certificate generation and the SDK's refusal to send tokens in plaintext off the machine."""

import shutil
import subprocess

import pytest

from deltazip.client.credentials import call_metadata, client_tls
from deltazip.security import certs
from deltazip.security.tls import PLAINTEXT, TlsSettings, from_env, is_loopback


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    return certs.generate(tmp_path_factory.mktemp("certs"))


def test_generated_certificates_verify_and_name_every_service(generated):
    done = subprocess.run(["openssl", "verify", "-CAfile", str(generated.ca), str(generated.server_cert),
                           str(generated.client_cert)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(generated.server_cert), "-noout", "-text"],
                          capture_output=True, text=True).stdout
    for name in ("localhost", "127.0.0.1", "delta_store", "scheduler", "worker", "gateway", "redis"):
        assert name in text
    assert "TLS Web Client Authentication" in text  # the cluster certificate doubles as a client certificate
    assert (generated.server_key.stat().st_mode & 0o777) == 0o600


def test_missing_openssl_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(certs.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openssl"):
        certs.generate(tmp_path / "c")


def test_settings_are_validated_with_the_flag_to_fix(tmp_path, generated):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        TlsSettings(cert=str(generated.server_cert))
    with pytest.raises(ValueError, match="--tls-ca"):
        TlsSettings(ca=str(tmp_path / "nope.crt"))
    with pytest.raises(ValueError, match="--tls-require-client-cert"):
        TlsSettings(cert=str(generated.server_cert), key=str(generated.server_key), require_client_cert=True)
    server = TlsSettings(ca=str(generated.ca), cert=str(generated.server_cert), key=str(generated.server_key))
    assert server.serves_tls and server.dials_tls and not PLAINTEXT.dials_tls


def test_client_tls_defaults_come_from_env(monkeypatch, generated):
    monkeypatch.delenv("DELTAZIP_TLS_CA", raising=False)
    assert client_tls(None) == PLAINTEXT and client_tls(True).dials_tls and client_tls(False) == PLAINTEXT
    monkeypatch.setenv("DELTAZIP_TLS_CA", str(generated.ca))
    assert client_tls(None).ca == str(generated.ca) and from_env().dials_tls


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:5", True),
                                               ("scheduler:50051", False), ("10.0.0.5:50051", False)])
def test_tokens_never_travel_in_plaintext_off_the_machine(address, loopback):
    assert is_loopback(address) is loopback
    if loopback:
        assert call_metadata(address, PLAINTEXT, "dz_x") == (("authorization", "Bearer dz_x"),)
    else:
        with pytest.raises(ValueError, match="plaintext"):
            call_metadata(address, PLAINTEXT, "dz_x")
        assert call_metadata(address, TlsSettings(system_roots=True), "dz_x")
    assert call_metadata(address, PLAINTEXT, "") == ()
