"""The worker supervisor's guards, without a stack: port ownership, worker count, settings."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.dataplane.workers import (
    available_cpus,
    reserve_port,
    reserve_ports,
    worker_addresses,
    worker_count,
)
from extproc.settings import ConfigError, Settings, check_mode, load_settings


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """Something else already listening on a port, as SO_REUSEPORT would silently join."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_port_someone_listens_on_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot bind 127.0.0.1:{port}"):
        reserve_port(f"127.0.0.1:{port}")


def test_port_zero_is_resolved_and_held_for_the_workers() -> None:
    listen, held = reserve_port("127.0.0.1:0")
    try:
        port = int(listen.rsplit(":", 1)[1])
        assert port > 0 and held.getsockname()[1] == port
        workers = []
        for _ in range(2):  # what each worker does: join the port with SO_REUSEPORT
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            workers.append(sock)
        with pytest.raises(OSError):  # and a stranger without it cannot
            socket.create_server(("127.0.0.1", port))
        for sock in workers:
            sock.close()
    finally:
        held.close()


def test_unix_sockets_need_a_single_worker() -> None:
    with pytest.raises(ConfigError, match="TCP"):
        reserve_port("unix:/tmp/extproc.sock")
    assert worker_count(Settings(listen="unix:/tmp/extproc.sock")) == 1
    assert worker_count(Settings(listen="unix:/tmp/extproc.sock", workers=3)) == 3
    assert worker_count(Settings()) == available_cpus() >= 1


def test_workers_setting_from_env() -> None:
    assert load_settings(env={"EXTPROC_WORKERS": "0"}).workers == 0
    assert load_settings(env={"EXTPROC_WORKERS": "4"}).workers == 4
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ConfigError, match="EXTPROC_WORKERS: workers: must be a whole number"):
            load_settings(env={"EXTPROC_WORKERS": bad})


def test_each_worker_gets_its_own_port_after_the_shared_one_on_loopback() -> None:
    assert worker_addresses(Settings(), 3, "0.0.0.0:9001") == [
        "127.0.0.1:9002",
        "127.0.0.1:9003",
        "127.0.0.1:9004",
    ]
    assert worker_addresses(Settings(), 2, "[::]:9001") == ["[::1]:9002", "[::1]:9003"]
    assert worker_addresses(Settings(), 2, "10.0.0.7:9001") == ["10.0.0.7:9002", "10.0.0.7:9003"]
    chosen = Settings(worker_listen="127.0.0.1:9101")
    assert worker_addresses(chosen, 2, "0.0.0.0:9001") == ["127.0.0.1:9101", "127.0.0.1:9102"]
    assert worker_addresses(Settings(worker_listen="127.0.0.1:0"), 2, "0.0.0.0:9001") == [
        "127.0.0.1:0",
        "127.0.0.1:0",
    ]
    assert load_settings(env={"EXTPROC_WORKER_LISTEN": "127.0.0.1:9101"}).worker_listen == (
        "127.0.0.1:9101"
    )


def test_worker_ports_that_cannot_be_are_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="worker_listen: ports 9000-9001 include the shared"):
        worker_addresses(Settings(worker_listen="127.0.0.1:9000"), 2, "0.0.0.0:9001")
    with pytest.raises(ConfigError, match="worker_listen: 3 ports from 65534 go past 65535"):
        worker_addresses(Settings(worker_listen="127.0.0.1:65534"), 3, "0.0.0.0:9001")
    with pytest.raises(ConfigError, match="worker_listen: must be host:port"):
        worker_addresses(Settings(worker_listen="nine"), 2, "0.0.0.0:9001")


def test_a_worker_port_someone_listens_on_is_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    settings = Settings(listen="127.0.0.1:0", worker_listen=f"127.0.0.1:{port - 1}")
    with pytest.raises(ConfigError, match=f"worker_listen: cannot bind 127.0.0.1:{port}"):
        reserve_ports(settings, 2)


def test_worker_ports_are_held_for_the_supervisors_life() -> None:
    """Each worker's port is concrete and held: the worker joins it (SO_REUSEPORT), a
    stranger cannot bind it, and while the worker is gone it refuses connections."""
    settings = Settings(listen="127.0.0.1:0", worker_listen="127.0.0.1:0")
    listen, own, held = reserve_ports(settings, 2)
    try:
        assert len(own) == 2 and len(held) == 3 and listen not in own
        ports = [int(a.rsplit(":", 1)[1]) for a in own]
        assert all(ports) and len(set(ports)) == 2
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", ports[0]))
        worker.listen()
        socket.create_connection(("127.0.0.1", ports[0]), timeout=5).close()
        with pytest.raises(OSError):
            socket.create_server(("127.0.0.1", ports[0]))
        worker.close()  # the worker died: refused, yet still ours
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports[0]), timeout=5)
        with pytest.raises(OSError):
            socket.create_server(("127.0.0.1", ports[0]))
    finally:
        for sock in held:
            sock.close()


def test_serve_on_a_taken_port_says_so_without_a_traceback(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--workers", "2"],
        env={
            "EXTPROC_LISTEN": f"127.0.0.1:{port}",
            "EXTPROC_METERING_ONLY": "1",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_metering_only_is_said_or_a_policy_is_required() -> None:
    for yes in ("1", "true", "YES", "on"):
        assert load_settings(env={"EXTPROC_METERING_ONLY": yes}).metering_only is True
    for no in ("0", "false", "off", ""):
        assert load_settings(env={"EXTPROC_METERING_ONLY": no}).metering_only is False
    with pytest.raises(ConfigError, match="EXTPROC_METERING_ONLY: metering_only: must be true"):
        load_settings(env={"EXTPROC_METERING_ONLY": "maybe"})
    with pytest.raises(ConfigError, match="no policy: set EXTPROC_POLICY"):
        check_mode(Settings())
    with pytest.raises(ConfigError, match="choose one"):
        check_mode(Settings(policy="p.yaml", metering_only=True))
    check_mode(Settings(policy="p.yaml"))
    check_mode(Settings(metering_only=True))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_a_missing_policy_refuses_in_one_line(workers: str, tmp_path: Path) -> None:
    """Never the ungoverned fallback: a policy path that is set but unreadable stops it."""
    for env, expected in (
        ({"EXTPROC_POLICY": str(tmp_path / "gone.yaml")}, "not starting: policy "),
        ({}, "no policy: set EXTPROC_POLICY"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "extproc", "serve", "--workers", workers],
            env={"EXTPROC_LISTEN": "127.0.0.1:0", "PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
