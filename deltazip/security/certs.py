"""Self-signed certificates for a DeltaZip cluster, made with the `openssl` command (no Python crypto dependency).

`generate(dir)` writes a CA (ca.crt, ca.key) and one cluster certificate (server.crt, server.key) that every
service serves and also presents as its client certificate (mutual TLS), plus a client certificate for
operators' tools (client.crt, client.key). Keys are 0600.
"""

import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Loopback (tests, `make demo`), the compose service names, and "deltazip": the one name compose services check
# (DELTAZIP_TLS_SERVER_NAME), since scaled workers advertise container ids that no certificate can list.
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1", "deltazip", "redis", "delta_store", "scheduler", "worker", "worker-cpu",
                 "gateway")
FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Paths of a generated set."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    def exists(self) -> bool:
        return all((self.dir / name).is_file() for name in FILES)


def subject_alt_names(names: list[str] | tuple[str, ...]) -> str:
    """"DNS:localhost,IP:127.0.0.1,..." for an openssl extension file."""
    parts = []
    for name in names:
        try:
            parts.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            parts.append(f"DNS:{name}")
    return ",".join(parts)


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the `openssl` command is needed to generate certificates: install it "
                           "(apt-get install openssl) or bring your own CA and certificates")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-2000:]}")


def _leaf(tmp: Path, stem: str, cn: str, ext: str, days: int) -> None:
    """A P-256 key and a certificate for it signed by the CA in `tmp`."""
    (tmp / f"{stem}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{stem}.key",
             "-out", f"{stem}.csr", "-subj", f"/CN={cn}", cwd=tmp)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{stem}.crt", "-days", str(days), "-sha256", "-extfile", f"{stem}.ext", cwd=tmp)


def generate(out_dir: Path, names: list[str] | tuple[str, ...] = DEFAULT_NAMES, days: int = 825) -> CertFiles:
    """Write a fresh CA + cluster certificate (SANs = `names`) + client certificate into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".certs-") as tmp_name:
        tmp = Path(tmp_name)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
                 "-out", "ca.crt", "-days", str(days), "-sha256", "-subj", "/CN=DeltaZip self-signed CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=tmp)
        common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        _leaf(tmp, "server", "deltazip", common + "extendedKeyUsage=serverAuth,clientAuth\n"
              f"subjectAltName={subject_alt_names(names)}\n", days)
        _leaf(tmp, "client", "deltazip-client", common + "extendedKeyUsage=clientAuth\n", days)
        for name in FILES:  # each file appears whole: written in tmp, then renamed
            os.chmod(tmp / name, 0o600 if name.endswith(".key") else 0o644)
            os.replace(tmp / name, out_dir / name)
    return CertFiles(out_dir)
