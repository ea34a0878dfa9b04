"""HPACK header block decoding (RFC 7541), the only compression state an HTTP/2 server keeps.

Every header block the peer sends must be decoded, even ones we then ignore, because
the peer's encoder and our decoder share one dynamic table per connection. We never
index anything when encoding (our response blocks are fixed bytes), so there is no
encoder here. Names and values stay `bytes`: callers compare them with byte literals.
"""

from __future__ import annotations

from collections import deque

from extproc.dataplane.h2grpc.huffman import HuffmanError, huffman_decode

Header = tuple[bytes, bytes]

STATIC_TABLE: tuple[Header, ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LEN = len(STATIC_TABLE)
ENTRY_OVERHEAD = 32
DEFAULT_TABLE_SIZE = 4096
_MAX_INT_SHIFT = 28
_NO_LIMIT = 1 << 62
# Envoy sends `:path` as a Huffman literal without indexing on every stream: remember
# recent short decodings instead of decoding the same bytes each time.
_HUFFMAN_CACHE: dict[bytes, bytes] = {}
_HUFFMAN_CACHE_ENTRIES = 512
_HUFFMAN_CACHE_MAX_LEN = 256


class HpackError(ValueError):
    """The block cannot be decoded: a connection error (COMPRESSION_ERROR) in HTTP/2."""


class HeaderListTooLarge(Exception):
    """The decoded list exceeds the limit we advertised: a stream error, not a connection one.

    Raised only after the whole block was decoded, so the dynamic table stays in step
    with the peer's encoder and the connection can go on.
    """


def encode_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer with an N-bit prefix; `first` holds the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman: needs no encoder state."""
    return b"".join((b"\x00", encode_int(len(name), 7), name, encode_int(len(value), 7), value))


def _read_int(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 127) << shift
        if byte < 128:
            return value, pos
        shift += 7
        if shift > _MAX_INT_SHIFT:
            raise HpackError("HPACK integer too large")


def _read_string(block: bytes, pos: int) -> tuple[bytes, int]:
    huffman = block[pos] & 0x80
    length, pos = _read_int(block, pos, 0x7F)
    end = pos + length
    if end > len(block):
        raise HpackError("HPACK string runs past the end of the block")
    raw = block[pos:end]
    if huffman:
        cached = _HUFFMAN_CACHE.get(raw)
        if cached is not None:
            return cached, end
        try:
            decoded = huffman_decode(raw)
        except HuffmanError as exc:
            raise HpackError(str(exc)) from None
        if length <= _HUFFMAN_CACHE_MAX_LEN:
            if len(_HUFFMAN_CACHE) >= _HUFFMAN_CACHE_ENTRIES:
                _HUFFMAN_CACHE.clear()
            _HUFFMAN_CACHE[raw] = decoded
        return decoded, end
    return raw, end


class HeaderDecoder:
    """Decoder state for one connection: the dynamic table and its size limits.

    `max_allowed` is what we advertised as SETTINGS_HEADER_TABLE_SIZE; the peer's encoder
    may shrink the table below that with a size update at the start of a block.
    """

    __slots__ = ("_entries", "_max_size", "_size", "max_allowed")

    def __init__(self, max_allowed: int = DEFAULT_TABLE_SIZE) -> None:
        self._entries: deque[Header] = deque()
        self._size = 0
        self._max_size = max_allowed
        self.max_allowed = max_allowed

    @property
    def table_size(self) -> int:
        return self._size

    @property
    def table(self) -> list[Header]:
        """Dynamic table entries, newest first (for tests)."""
        return list(self._entries)

    def _lookup(self, index: int) -> Header:
        if 0 < index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        dyn = index - _STATIC_LEN - 1
        if index == 0 or dyn >= len(self._entries):
            raise HpackError(f"HPACK index {index} out of range")
        return self._entries[dyn]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        entries = self._entries
        while entries and self._size + size > self._max_size:
            old_name, old_value = entries.pop()
            self._size -= len(old_name) + len(old_value) + ENTRY_OVERHEAD
        if size <= self._max_size:
            entries.appendleft((name, value))
            self._size += size

    def _resize(self, new_size: int) -> None:
        if new_size > self.max_allowed:
            raise HpackError(f"table size update {new_size} above {self.max_allowed}")
        self._max_size = new_size
        entries = self._entries
        while self._size > new_size:
            old_name, old_value = entries.pop()
            self._size -= len(old_name) + len(old_value) + ENTRY_OVERHEAD

    def decode(self, block: bytes, max_list_size: int | None = None) -> list[Header]:
        """All header fields of one complete block, in order; updates the dynamic table.

        With `max_list_size` (SETTINGS_MAX_HEADER_LIST_SIZE), fields past the limit are
        decoded but not kept, and `HeaderListTooLarge` is raised at the end: a small
        block of indexed references cannot expand into a huge list in memory.
        """
        headers: list[Header] = []
        pos = 0
        end = len(block)
        budget = limit = _NO_LIMIT if max_list_size is None else max_list_size
        try:
            while pos < end:
                first = block[pos]
                if first & 0x80:
                    index, pos = _read_int(block, pos, 0x7F)
                    field = self._lookup(index)
                    budget -= len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
                    if budget >= 0:
                        headers.append(field)
                    continue
                if first & 0x40:
                    mask = 0x3F
                elif first & 0x20:
                    if budget != limit:
                        raise HpackError("table size update after a header field")
                    size, pos = _read_int(block, pos, 0x1F)
                    self._resize(size)
                    continue
                else:
                    mask = 0x0F
                index, pos = _read_int(block, pos, mask)
                if index:
                    name = self._lookup(index)[0]
                else:
                    name, pos = _read_string(block, pos)
                value, pos = _read_string(block, pos)
                if mask == 0x3F:
                    self._add(name, value)
                budget -= len(name) + len(value) + ENTRY_OVERHEAD
                if budget >= 0:
                    headers.append((name, value))
        except IndexError:
            raise HpackError("truncated HPACK block") from None
        if budget < 0:
            raise HeaderListTooLarge(f"header list above {max_list_size} bytes")
        return headers
