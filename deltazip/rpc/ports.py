"""Free loopback ports for tests and local runs."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class PortRange:
    """Ports of [first, last] handed out in turn, each bindable when handed out.

    `free_port` lets two processes that pick at the same moment get the same port (free between the pick
    and the bind); stacks run side by side on one host are given disjoint ranges instead, so they never can.
    """

    def __init__(self, first: int, last: int, host: str = "127.0.0.1"):
        if not 1024 <= first <= last <= 65535:
            raise ValueError(f"port range must lie in 1024-65535 with first <= last, got {first}-{last}")
        self.first, self.last, self.host = first, last, host
        self._next = first

    @classmethod
    def parse(cls, text: str) -> "PortRange":
        """'20000-20099' -> PortRange(20000, 20099)."""
        first, sep, last = text.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"port range wants FIRST-LAST, e.g. 20000-20099, got {text!r}")
        return cls(int(first), int(last))

    def __call__(self) -> int:
        """The next bindable port (rotating, so a port just given up is the last to be handed out again)."""
        size = self.last - self.first + 1
        for _ in range(size):
            port = self._next
            self._next = self.first + (port + 1 - self.first) % size
            if _bindable(self.host, port):
                return port
        raise OSError(f"no free port left in {self.first}-{self.last}")
