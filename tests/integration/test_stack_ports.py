"""Stacks side by side on one host: disjoint port ranges, and a redis-server whose port is taken is refused."""

import socket

import pytest

from deltazip.rpc.ports import PortRange
from deltazip.stack import start_redis, stop


def test_port_range_hands_out_bindable_ports_in_turn():
    ports = PortRange.parse("23000-23003")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 23001))
        held.listen()
        got = [ports() for _ in range(3)]
    assert got == [23000, 23002, 23003]  # 23001 was taken when its turn came
    assert ports() == 23000  # rotates


def test_port_range_exhausted_or_malformed():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 23010))
        held.listen()
        with pytest.raises(OSError, match="no free port left in 23010-23010"):
            PortRange(23010, 23010)()
    for bad in ("23000", "a-b", "23005-23000", "80-90"):
        with pytest.raises(ValueError, match="port range"):
            PortRange.parse(bad)


def test_redis_on_a_port_another_stack_holds_is_refused(tmp_path):
    first = start_redis(tmp_path / "a")
    try:
        port = int(first.address.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match=f"port {port} is served by another redis-server"):
            start_redis(tmp_path / "b", port=port)
    finally:
        stop(first)
