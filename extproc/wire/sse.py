"""Server-sent events parser for provider response streams.

Envoy hands us the response body in arbitrary chunks, so events and lines (and UTF-8
characters) straddle chunk boundaries. The parser follows the WHATWG event-stream
rules and works on bytes: line terminators are ASCII, so splitting bytes never cuts a
UTF-8 character, and each field is decoded once when complete.

It also records where each event's bytes lie in the stream (`feed_spans`), which lets
a caller drop one event from the bytes it forwards without re-serialising the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    event: str | None
    data: str


class SSEParser:
    __slots__ = (
        "_block_start",
        "_bom_pending",
        "_data",
        "_event",
        "_partial",
        "_partial_start",
        "_skip_lf",
        "_total",
        "last_event_id",
        "retry",
    )

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._partial_start = 0
        self._total = 0
        self._block_start = 0
        self._skip_lf = False
        self._bom_pending = True
        self._data: list[bytes] = []
        self._event: str | None = None
        self.last_event_id: str | None = None
        self.retry: int | None = None

    @property
    def pending(self) -> bool:
        """Whether part of an event that was never terminated is buffered."""
        return bool(self._partial or self._data) or self._event is not None

    @property
    def boundary(self) -> int:
        """Stream offset where the current, unterminated block of lines starts."""
        return self._block_start

    @property
    def consumed(self) -> int:
        return self._total

    @property
    def awaiting_lf(self) -> bool:
        """The last byte was a CR ending a line; an LF next would belong to it."""
        return self._skip_lf

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        self._feed(chunk, out, None)
        return out

    def feed_spans(self, chunk: bytes) -> list[tuple[SSEEvent, int, int]]:
        """Like feed, with each event's [start, end) byte offsets in the whole stream."""
        out: list[SSEEvent] = []
        spans: list[tuple[int, int]] = []
        self._feed(chunk, out, spans)
        return [(ev, start, end) for ev, (start, end) in zip(out, spans, strict=True)]

    def close(self) -> list[SSEEvent]:
        """End of stream: an unterminated final event is discarded, never dispatched."""
        return []

    def _feed(self, chunk: bytes, out: list[SSEEvent], spans: list[tuple[int, int]] | None) -> None:
        if not chunk:
            return
        base = self._total
        self._total += len(chunk)
        if self._bom_pending:
            chunk, base = self._strip_bom(chunk, base)
            if not chunk:
                return
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                if self._block_start == base:
                    self._block_start += 1
                chunk = chunk[1:]
                base += 1
                if not chunk:
                    return
        has_cr = b"\r" in chunk
        if not has_cr and b"\n" not in chunk:
            if not self._partial:
                self._partial_start = base
            self._partial.append(chunk)
            return
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            base = self._partial_start
            self._partial = []
        if has_cr:
            self._scan_mixed(chunk, base, out, spans)
            return
        lines = chunk.split(b"\n")
        tail = lines.pop()
        pos = base
        for line in lines:
            pos += len(line) + 1
            if line:
                self._field(line)
            else:
                self._dispatch(pos, out, spans)
        if tail:
            self._partial = [tail]
            self._partial_start = pos

    def _scan_mixed(
        self, chunk: bytes, base: int, out: list[SSEEvent], spans: list[tuple[int, int]] | None
    ) -> None:
        n = len(chunk)
        start = 0
        cr = chunk.find(b"\r")
        lf = chunk.find(b"\n")
        while start < n:
            if 0 <= cr < start:
                cr = chunk.find(b"\r", start)
            if 0 <= lf < start:
                lf = chunk.find(b"\n", start)
            if cr < 0 and lf < 0:
                self._partial = [chunk[start:]]
                self._partial_start = base + start
                return
            if cr < 0 or 0 <= lf < cr:
                end = lf
                nxt = lf + 1
            elif cr + 1 < n:
                end = cr
                nxt = cr + 2 if chunk[cr + 1] == 0x0A else cr + 1
            else:
                end = cr
                nxt = n
                self._skip_lf = True
            line = chunk[start:end]
            if line:
                self._field(line)
            else:
                self._dispatch(base + nxt, out, spans)
            start = nxt

    def _strip_bom(self, chunk: bytes, base: int) -> tuple[bytes, int]:
        head = b"".join([*self._partial, chunk])
        if len(head) < 3 and _BOM.startswith(head):
            self._partial = [head]
            return b"", base
        self._bom_pending = False
        self._partial = []
        if head.startswith(_BOM):
            return head[3:], 3
        return head, 0

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self.last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self.retry = int(value)

    def _dispatch(self, end: int, out: list[SSEEvent], spans: list[tuple[int, int]] | None) -> None:
        start = self._block_start
        self._block_start = end
        data = self._data
        if not data:
            self._event = None
            return
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        out.append(SSEEvent(self._event or None, text))
        if spans is not None:
            spans.append((start, end))
        self._data = []
        self._event = None
