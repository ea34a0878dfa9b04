"""A lean asyncio Redis client for the two calls on every request: reserve and settle.

redis-py's asyncio client spends ~150 µs of CPU per command (connection checkout, retry
wrappers, response callbacks, a `StreamReader` per socket); with budgets on, a request
makes two such calls and they were most of the sidecar's CPU. This client speaks RESP2
straight from an `asyncio.Protocol`: a command is one `bytes` written to a connection
that already carries others (replies come back in order, so a deque of waiters matches
them), and a reply is parsed out of the bytes the transport hands over.

Behind Sentinel (`redis+sentinel://` URLs) a connection asks the Sentinels for the
primary's address each time it opens, and checks with ROLE that it reached a primary; a
READONLY reply (the node was demoted under us) closes the connection, so the next command
asks again. That is how the hot path follows a failover.

What it keeps from redis-py is the vocabulary callers catch: error replies and lost
connections raise `redis.exceptions` classes (`NoScriptError`, `ResponseError`,
`ConnectionError`, `TimeoutError`), so `redis_client.UNAVAILABLE` still means "Redis is
away". What it drops: clusters, RESP3, response callbacks (replies are raw: bytes, int,
list, None) and retries. A lost connection fails whatever it carried; the next command
opens a new one, once, with no backoff, because every caller has a better answer than
waiting (fail open or closed, spool to disk).

Commands written in the same loop iteration leave in one write, and one read usually
carries many replies, so a burst costs a few system calls, not one per command. A slow
server is noticed per connection, not per command: while replies are owed, a connection
that receives nothing for `socket_timeout` seconds fails everything it carries.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Endpoint", "FastPipeline", "FastRedis", "encode", "parse_reply", "parse_url"]

_ERROR_CLASSES: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "NOPERM": NoPermissionError,
    "OOM": OutOfMemoryError,
    "LOADING": BusyLoadingError,
}

_DOLLAR, _STAR, _PLUS, _MINUS, _COLON = b"$*+-:"
_INCOMPLETE: Any = object()


# --- URLs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of host:port
    username: str | None = None
    password: str | None = None
    db: int = 0
    # Behind Sentinel: where to ask for the primary of `service` (host and port unused).
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_password: str | None = None


def parse_url(url: str) -> Endpoint:
    """`redis://[user:pass@]host[:port][/db]`, `unix://[user:pass@]/path[?db=N]` or
    `redis+sentinel://[user:pass@]host:port,.../service[/db]` (see store.clients)."""
    parts = urlsplit(url)
    if parts.scheme == "redis+sentinel":
        from extproc.store.clients import parse_sentinel_url

        s = parse_sentinel_url(url)
        assert s is not None
        return Endpoint(
            username=s.username,
            password=s.password,
            db=s.db,
            sentinels=s.sentinels,
            service=s.service,
            sentinel_password=s.sentinel_password,
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"db"}
    if unknown:
        raise ValueError(f"unsupported Redis URL parameters: {', '.join(sorted(unknown))}")
    db_text = query.get("db", [""])[0]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        return Endpoint(path=parts.path, db=int(db_text or 0), username=username, password=password)
    if parts.scheme != "redis":
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    db_text = db_text or parts.path.strip("/")
    return Endpoint(
        host=parts.hostname or "localhost",
        port=parts.port or 6379,
        db=int(db_text or 0),
        username=username,
        password=password,
    )


def supports_url(url: str) -> bool:
    try:
        parse_url(url)
    except ValueError:
        return False
    return True


# --- RESP ------------------------------------------------------------------------------


def _arg(value: Any) -> bytes:
    kind = type(value)
    if kind is bytes:
        return value  # type: ignore[no-any-return]
    if kind is str:
        return value.encode()  # type: ignore[no-any-return]
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value).encode()  # str/int subclasses (enums)
    raise TypeError(f"Redis arguments are bytes, str or int, not {kind.__name__}")


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    append = out.append
    for value in args:
        kind = type(value)
        if kind is str:
            value = value.encode()
        elif kind is int:
            value = b"%d" % value
        elif kind is not bytes:
            value = _arg(value)
        append(b"$%d\r\n%b\r\n" % (len(value), value))
    return b"".join(out)


def error_for(line: bytes) -> RedisError:
    """The redis-py exception for an error reply, e.g. `NOSCRIPT ...` -> NoScriptError."""
    text = line.decode("utf-8", "replace")
    code, _, rest = text.partition(" ")
    cls = _ERROR_CLASSES.get(code)
    return cls(rest) if cls is not None else ResponseError(text)


def parse_reply(data: bytes, pos: int) -> tuple[Any, int]:
    """One reply starting at `data[pos]`: (value, end), or (INCOMPLETE, bytes still needed).

    The second figure of an incomplete reply is a lower bound on the buffer length, from
    `pos`, that could hold it: a reader waits for that much before trying again, so a
    large value arriving in many reads is parsed once, not once per read.
    """
    end = data.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, len(data) - pos + 1
    kind = data[pos]
    if kind == _DOLLAR:
        n = int(data[pos + 1 : end])
        if n < 0:
            return None, end + 2
        start = end + 2
        stop = start + n
        if stop + 2 > len(data):
            return _INCOMPLETE, stop + 2 - pos
        return data[start:stop], stop + 2
    if kind == _STAR:
        n = int(data[pos + 1 : end])
        if n < 0:
            return None, end + 2
        items = []
        at = end + 2
        for _ in range(n):
            item, stop = parse_reply(data, at)
            if item is _INCOMPLETE:
                return _INCOMPLETE, stop + at - pos
            items.append(item)
            at = stop
        return items, at
    if kind == _COLON:
        return int(data[pos + 1 : end]), end + 2
    if kind == _PLUS:
        return data[pos + 1 : end], end + 2
    if kind == _MINUS:
        return error_for(data[pos + 1 : end]), end + 2
    raise RedisConnectionError(f"Redis protocol error: unexpected reply type {chr(kind)!r}")


# --- connections -----------------------------------------------------------------------


class _Batch:
    """Waits for `left` consecutive replies: a pipeline, or the AUTH/SELECT handshake."""

    __slots__ = ("future", "left", "replies")

    def __init__(self, future: asyncio.Future[Any] | None, count: int) -> None:
        self.future = future
        self.left = count
        self.replies: list[Any] = []


def _fail(waiter: Any, error: RedisError) -> None:
    future = waiter.future if type(waiter) is _Batch else waiter
    if future is not None and not future.done():
        future.set_exception(type(error)(*error.args))


class _Connection(asyncio.Protocol):
    def __init__(self, client: FastRedis, handshake: list[bytes]) -> None:
        self._client = client
        loop = client._loop
        assert loop is not None, "a connection is made from inside the client's loop"
        self._loop: asyncio.AbstractEventLoop = loop
        self._timeout = client._socket_timeout
        self.pending: deque[Any] = deque()
        self._outbox: list[bytes] = list(handshake)
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = 0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        if handshake:
            self.pending.append(_Batch(None, len(handshake)))

    async def open(self, endpoint: Endpoint, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                if endpoint.path is not None:
                    await self._loop.create_unix_connection(lambda: self, endpoint.path)
                else:
                    host, port = endpoint.host, endpoint.port
                    if endpoint.sentinels:
                        host, port = await primary_address(endpoint)
                    await self._loop.create_connection(lambda: self, host, port)
        except TimeoutError:
            self.close(RedisTimeoutError(f"Timeout connecting to Redis at {_where(endpoint)}"))
        except OSError as exc:
            self.close(
                RedisConnectionError(f"Error connecting to Redis at {_where(endpoint)}: {exc}")
            )
        except BaseException:
            self.close(RedisConnectionError("Redis connection attempt was cancelled"))
            raise

    def send(self, payload: bytes, waiter: Any) -> None:
        pending = self.pending
        outbox = self._outbox
        transport = self._transport
        if not pending:
            self._last = self._loop.time()
            if transport is not None and not outbox:
                pending.append(waiter)
                transport.write(payload)
                if self._timer is None:
                    self._timer = self._loop.call_at(self._last + self._timeout, self._watch)
                return
        pending.append(waiter)
        outbox.append(payload)
        if len(outbox) == 1 and transport is not None:
            self._loop.call_soon(self._flush)
            if self._timer is None:
                self._timer = self._loop.call_at(self._last + self._timeout, self._watch)

    def _flush(self) -> None:
        outbox = self._outbox
        if outbox and self._transport is not None and not self.closed:
            self._transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))
            outbox.clear()

    def _watch(self) -> None:
        self._timer = None
        if self.closed or not self.pending:
            return
        due = self._last + self._timeout
        if self._loop.time() >= due:
            self.close(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self._timer = self._loop.call_at(due, self._watch)

    # -- transport callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.closed:
            transport.close()
            return
        self._last = self._loop.time()
        self._flush()
        if self.pending and self._timer is None:
            self._timer = self._loop.call_at(self._last + self._timeout, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.close(RedisConnectionError(f"Connection to Redis lost{reason}"))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        self._last = self._loop.time()
        pending = self.pending
        pos = 0
        size = len(data)
        try:
            while pos < size:
                reply, end = parse_reply(data, pos)
                if reply is _INCOMPLETE:
                    buf += data[pos:]
                    self._need = end
                    return
                pos = end
                waiter = pending[0]
                if type(waiter) is _Batch:
                    waiter.replies.append(reply)
                    waiter.left -= 1
                    if waiter.left:
                        continue
                    pending.popleft()
                    self._finish(waiter)
                    if self.closed:
                        return
                    continue
                pending.popleft()
                if waiter.done():
                    continue
                if isinstance(reply, RedisError):
                    waiter.set_exception(reply)
                    if type(reply) is ReadOnlyError:  # demoted: ask where the primary is now
                        self.close(RedisConnectionError("Redis node is no longer the primary"))
                        return
                else:
                    waiter.set_result(reply)
        except IndexError:
            self.close(RedisConnectionError("Redis sent a reply nobody asked for"))
        except (ValueError, RedisConnectionError) as exc:
            self.close(RedisConnectionError(f"Redis protocol error: {exc}"))

    def _finish(self, batch: _Batch) -> None:
        if batch.future is None:
            errors = [r for r in batch.replies if isinstance(r, RedisError)]
            if errors:
                self.close(_handshake_error(errors[0]))
            elif self._client.endpoint.sentinels and not _is_primary(batch.replies[-1]):
                self.close(RedisConnectionError("Sentinel named a node that is not a primary"))
        elif not batch.future.done():
            batch.future.set_result(batch.replies)

    def close(self, error: RedisError) -> None:
        """Fail every waiter with `error` and leave the pool; idempotent."""
        if not self.closed:
            self.closed = True
            self._client._forget(self)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._transport is not None:
                self._transport.abort()
        pending, self.pending = self.pending, deque()
        for waiter in pending:
            _fail(waiter, error)


def _handshake_error(error: RedisError) -> RedisError:
    if isinstance(error, AuthenticationError) or "password" in str(error):
        return AuthenticationError(f"Redis refused the credentials: {error}")
    return RedisConnectionError(f"Redis refused the connection setup: {error}")


def _where(endpoint: Endpoint) -> str:
    return endpoint.path or f"{endpoint.host}:{endpoint.port}"


# --- the client --------------------------------------------------------------------------


class FastRedis:
    """A small pool of pipelined connections to one Redis node (belongs to one event loop).

    Each command goes to the connection with the fewest replies owed; a new connection is
    opened only when every open one is busy, so sequential callers share one connection
    and a burst fans out over at most `max_connections`. Commands queue behind each other
    on a connection, so blocking commands (BLPOP, WAIT) and pub/sub do not belong here.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_connections: int = 8,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.endpoint = endpoint
        self._max = max_connections
        self._socket_timeout = socket_timeout
        self._connect_timeout = socket_connect_timeout
        self._conns: list[_Connection] = []
        self._opening: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshake = _handshake(endpoint)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        max_connections: int = 8,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
    ) -> FastRedis:
        """A client for `url`; it connects on first use."""
        return cls(
            parse_url(url),
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
        )

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    def _pick(self) -> _Connection:
        best: _Connection | None = None
        fewest = 1 << 62
        for conn in self._conns:
            owed = len(conn.pending)
            if owed < fewest:
                best, fewest = conn, owed
                if not owed:
                    return conn
        if best is None or len(self._conns) < self._max:
            return self._connect()
        return best

    def _connect(self) -> _Connection:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        conn = _Connection(self, self._handshake)
        self._conns.append(conn)
        task = self._loop.create_task(conn.open(self.endpoint, self._connect_timeout))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        return conn

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)

    async def execute_command(self, *args: Any) -> Any:
        conn = self._pick()
        future = conn._loop.create_future()
        conn.send(encode(args), future)
        return await future

    async def _execute_many(self, commands: list[bytes]) -> list[Any]:
        conn = self._pick()
        future: asyncio.Future[list[Any]] = conn._loop.create_future()
        conn.send(b"".join(commands), _Batch(future, len(commands)))
        return await future

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> str:
        sha = await self.execute_command("SCRIPT", "LOAD", script)
        return sha.decode()  # type: ignore[no-any-return]

    def pipeline(self, transaction: bool = False) -> FastPipeline:
        if transaction:
            raise ValueError("FastRedis pipelines are not transactions (no MULTI/EXEC)")
        return FastPipeline(self)

    async def aclose(self) -> None:
        for conn in list(self._conns):
            conn.close(RedisConnectionError("Redis client closed"))
        for task in list(self._opening):
            task.cancel()
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)
        self._loop = None


def _handshake(endpoint: Endpoint) -> list[bytes]:
    commands = []
    if endpoint.password is not None:
        credentials = [endpoint.username] if endpoint.username else []
        commands.append(encode(["AUTH", *credentials, endpoint.password]))
    if endpoint.db:
        commands.append(encode(["SELECT", endpoint.db]))
    if endpoint.sentinels:
        commands.append(encode(["ROLE"]))  # last: `_finish` checks it reached a primary
    return commands


def _is_primary(role: Any) -> bool:
    return isinstance(role, list) and bool(role) and role[0] == b"master"


async def primary_address(endpoint: Endpoint) -> tuple[str, int]:
    """Ask each Sentinel in turn where the primary of `endpoint.service` is."""
    request = b""
    if endpoint.sentinel_password:
        request += encode(["AUTH", endpoint.sentinel_password])
    request += encode(["SENTINEL", "GET-MASTER-ADDR-BY-NAME", endpoint.service])
    expected = 2 if endpoint.sentinel_password else 1
    problems = []
    for host, port in endpoint.sentinels:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            problems.append(f"{host}:{port}: {exc}")
            continue
        try:
            replies = await _exchange(reader, writer, request, expected)
        except (OSError, RedisError) as exc:
            problems.append(f"{host}:{port}: {exc}")
            continue
        found = replies[-1]
        if isinstance(found, list) and len(found) == 2:
            return found[0].decode(), int(found[1])
        problems.append(f"{host}:{port}: no primary for {endpoint.service!r} ({found!r})")
    raise RedisConnectionError("no Sentinel named a primary: " + "; ".join(problems))


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, expected: int
) -> list[Any]:
    """Send `request` and read `expected` replies, closing the connection either way."""
    try:
        writer.write(request)
        data, pos = b"", 0
        replies: list[Any] = []
        while len(replies) < expected:
            chunk = await reader.read(4096)
            if not chunk:
                raise RedisConnectionError("Sentinel closed the connection")
            data += chunk
            while len(replies) < expected:
                reply, end = parse_reply(data, pos)
                if reply is _INCOMPLETE:
                    break
                replies.append(reply)
                pos = end
        return replies
    finally:
        writer.close()


class FastPipeline:
    """Commands queued locally and sent in one write; replies read back in one list.

    Not a transaction: each command runs on its own, and an error reply stands in the
    list at its command's place (or, with `raise_on_error`, is raised once every reply has
    been read, so the connection stays in step).
    """

    def __init__(self, client: FastRedis) -> None:
        self._client = client
        self._commands: list[bytes] = []

    def __len__(self) -> int:
        return len(self._commands)

    async def __aenter__(self) -> FastPipeline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.reset()

    def reset(self) -> None:
        self._commands = []

    def execute_command(self, *args: Any) -> FastPipeline:
        self._commands.append(encode(args))
        return self

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> FastPipeline:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def hincrby(self, key: str, field: str, amount: int = 1) -> FastPipeline:
        return self.execute_command("HINCRBY", key, field, amount)

    def sadd(self, key: str, *members: Any) -> FastPipeline:
        return self.execute_command("SADD", key, *members)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self._commands = self._commands, []
        if not commands:
            return []
        replies = await self._client._execute_many(commands)
        if raise_on_error:
            for i, reply in enumerate(replies):
                if isinstance(reply, RedisError):
                    reply.add_note(f"command {i + 1} of {len(replies)} in the pipeline")
                    raise reply
        return replies
