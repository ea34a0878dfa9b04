"""PID 1 of a test "node": what the kubelet and the pod network give a pod, in one process.

Run by `tests/deploy/kubelet.py` under `unshare --net --mount`, so it starts in a network
namespace of its own (only loopback: the manifests' fixed ports collide with nothing on
the machine) and a private mount namespace. It then:

* brings loopback up;
* bind-mounts the test's hosts file over /etc/hosts, so Service names (extproc-redis,
  otel-collector, api.openai.com) resolve to the local processes that stand for them;
* bind-mounts the test CA bundle over the system bundle, so Envoy's unchanged upstream
  TLS settings trust the simulator posing as api.openai.com;
* keeps its own directory writable and remounts everything else read-only (every
  container in deploy/ runs with `readOnlyRootFilesystem: true`);
* forwards a Unix socket per port (`<dir>/portals/<port>.sock`) to 127.0.0.1:<port>, the
  way a test outside the namespace reaches the pods (a kubectl port-forward), and prints
  "sandbox ready" once all that is done. It serves until killed.

Usage: sandbox_init.py DIR HOSTS_FILE CA_BUNDLE PORT...
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


async def portal(path: Path, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            with contextlib.suppress(OSError):
                w.close()

    path.unlink(missing_ok=True)
    return await asyncio.start_unix_server(handle, str(path))


async def serve(directory: Path, ports: list[int]) -> None:
    portals = directory / "portals"
    portals.mkdir(exist_ok=True)
    servers = [await portal(portals / f"{port}.sock", port) for port in ports]
    print("sandbox ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str]) -> int:
    directory, hosts, ca = Path(argv[0]), argv[1], argv[2]
    ports = [int(p) for p in argv[3:]]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    mount("--bind", hosts, "/etc/hosts")
    mount("--bind", ca, "/etc/ssl/certs/ca-certificates.crt")
    mount("--bind", str(directory), str(directory))
    mount("-o", "remount,bind,ro", "/")
    asyncio.run(serve(directory, ports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
