"""Ports for the local stack's children: never from the range outgoing connections use."""

from __future__ import annotations

import socket
from pathlib import Path

from extproc.devstack import ports as stack


def _ephemeral() -> tuple[int, int]:
    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return low, high


def test_ports_are_outside_the_ephemeral_range_free_and_never_handed_out_twice() -> None:
    low, high = _ephemeral()
    ports = [stack.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= p <= high for p in ports)
    for port in ports[:20]:  # free: a listener can take each one
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_someone_holds_is_never_chosen() -> None:
    held = []
    try:
        for port in list(stack._listening_ports())[:300]:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
        chosen = {stack.free_port() for _ in range(100)}
        assert not chosen & taken
    finally:
        for s in held:
            s.close()


def test_consecutive_ports_are_free_and_new() -> None:
    first = stack.free_ports(4)
    second = stack.free_ports(4)
    assert first == list(range(first[0], first[0] + 4))
    assert not set(first) & set(second)
