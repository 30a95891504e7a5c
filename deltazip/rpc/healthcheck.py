"""`python -m deltazip.rpc.healthcheck HOST:PORT`: exit 0 when the server reports SERVING (compose healthchecks).

Over TLS when DELTAZIP_TLS_CA is set (the service's own env in compose), presenting DELTAZIP_TLS_CERT/KEY.
"""

import sys

from deltazip.rpc.health import wait_for_serving
from deltazip.security import tls


def main(argv: list[str]) -> int:
    """One probe with a short timeout; prints why it failed."""
    if len(argv) != 1:
        print("usage: python -m deltazip.rpc.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    try:
        settings = tls.from_env()
        wait_for_serving(argv[0], timeout_s=3.0, tls=settings)
    except (TimeoutError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
