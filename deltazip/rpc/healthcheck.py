"""`python -m deltazip.rpc.healthcheck HOST:PORT`: exit 0 when the server reports SERVING (compose healthchecks)."""

import sys

from deltazip.rpc.health import wait_for_serving


def main(argv: list[str]) -> int:
    """One probe with a short timeout; prints why it failed."""
    if len(argv) != 1:
        print("usage: python -m deltazip.rpc.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    try:
        wait_for_serving(argv[0], timeout_s=3.0)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
