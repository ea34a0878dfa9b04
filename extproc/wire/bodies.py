"""Request bodies exactly as the upstream will read them.

We meter what the provider bills, so we must see the same bytes and the same JSON the
provider sees: every content coding the client applied is undone (Codex sends zstd),
and the JSON is parsed at least as strictly as the provider parses it. Where parsers
disagree on the meaning of a document (duplicate keys) we refuse the request instead
of metering one model while the upstream serves another.

Decoding is incremental with a hard output cap so a compression bomb is stopped before
it allocates more than the cap.

Decisions on edge cases:
- A UTF-8 byte order mark is accepted and ignored (RFC 8259 allows it; the content is
  unambiguous).
- Numbers are accepted whatever their size. Floats beyond double range become
  infinities; they only fail if we must rewrite the body (`encode_json` refuses to emit
  non-JSON), which only happens for streaming chat/completions requests.
- Lone surrogate escapes (`"\\ud800"`) parse like in every mainstream parser;
  `encode_json` writes them back as escapes.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import zstandard

from extproc.wire.errors import OpenAIError, invalid_request

SUPPORTED_ENCODINGS: frozenset[str] = frozenset({"identity", "gzip", "x-gzip", "deflate", "zstd"})

_READ_SIZE = 1 << 18
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_MAX_WINDOW = 1 << 27
_ZSTD_MIN_WINDOW = 1 << 23  # what zstd levels 1-19 use without a content size
_JSON_HINT = (
    " (HINT: the API expects a UTF-8 JSON object as the request body; check how your HTTP "
    "library serialises and encodes it.)"
)


def _too_large(max_decoded: int) -> OpenAIError:
    return invalid_request(
        f"Request body too large: its decoded size exceeds {max_decoded} bytes.",
        code="request_too_large",
        status=413,
    )


def _corrupt(coding: str, detail: str) -> OpenAIError:
    return invalid_request(
        f"Could not decode the request body with Content-Encoding {coding!r}: {detail}.",
        code="invalid_content_encoding",
    )


def _codings(content_encoding: str | None) -> list[str]:
    if not content_encoding:
        return []
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    for coding in codings:
        if coding not in SUPPORTED_ENCODINGS:
            raise invalid_request(
                f"Unsupported Content-Encoding {coding!r}; supported: gzip, deflate, zstd.",
                code="unsupported_content_encoding",
                status=415,
            )
    return codings


def decode_body(raw: bytes, content_encoding: str | None, *, max_decoded: int) -> bytes:
    """Undo the content codings in `content_encoding`, last applied first."""
    codings = _codings(content_encoding)
    data = raw
    for coding in reversed(codings):
        if not data:
            break
        if coding == "zstd":
            data = _unzstd(data, max_decoded)
        else:
            data = _inflate(data, coding, max_decoded)
    if len(data) > max_decoded:
        raise _too_large(max_decoded)
    return data


def _zlib_wbits(data: bytes, coding: str) -> int:
    if coding != "deflate":
        return 16 + zlib.MAX_WBITS
    # HTTP "deflate" means the zlib wrapper, but some clients send raw deflate.
    if len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


def _inflate(data: bytes, coding: str, max_decoded: int) -> bytes:
    wbits = _zlib_wbits(data, coding)
    out: list[bytes] = []
    size = 0
    while True:
        dec = zlib.decompressobj(wbits)
        while True:
            limit = min(max_decoded - size + 1, _READ_SIZE)
            try:
                piece = dec.decompress(data, limit)
            except zlib.error as exc:
                raise _corrupt(coding, str(exc)) from None
            size += len(piece)
            if size > max_decoded:
                raise _too_large(max_decoded)
            out.append(piece)
            data = dec.unconsumed_tail
            if dec.eof or (len(piece) < limit and not data):
                break
        if not dec.eof:
            raise _corrupt(coding, "the compressed data is truncated")
        data = dec.unused_data
        if not data:
            return out[0] if len(out) == 1 else b"".join(out)
        if wbits <= 0 or wbits == zlib.MAX_WBITS:
            raise _corrupt(coding, "unexpected data after the end of the compressed stream")


def _zstd_frames(data: bytes) -> list[bytes]:
    """Split into zstd frames, skipping skippable frames; reject truncation and junk.

    The zstandard reader silently stops at a truncated frame, so the block structure is
    walked here to know that every frame is complete before decompressing it.
    """
    frames: list[bytes] = []
    n = len(data)
    pos = 0
    while pos < n:
        if n - pos < 4:
            raise _corrupt("zstd", "trailing bytes after the last frame")
        magic = int.from_bytes(data[pos : pos + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:
            if n - pos < 8:
                raise _corrupt("zstd", "truncated skippable frame")
            pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
            if pos > n:
                raise _corrupt("zstd", "truncated skippable frame")
            continue
        if magic != _ZSTD_MAGIC:
            raise _corrupt("zstd", f"no zstd frame at byte {pos}")
        try:
            header = zstandard.frame_header_size(data[pos : pos + 18])
        except zstandard.ZstdError:
            raise _corrupt("zstd", "truncated frame header") from None
        checksum = 4 if data[pos + 4] & 0x04 else 0
        p = pos + header
        while True:
            if p + 3 > n:
                raise _corrupt("zstd", "the compressed data is truncated")
            block = int.from_bytes(data[p : p + 3], "little")
            kind = (block >> 1) & 3
            if kind == 3:
                raise _corrupt("zstd", "reserved block type")
            p += 3 + (1 if kind == 1 else block >> 3)
            if block & 1:
                break
        p += checksum
        if p > n:
            raise _corrupt("zstd", "the compressed data is truncated")
        frames.append(data[pos:p] if pos or p != n else data)
        pos = p
    return frames


def _zstd_window(max_decoded: int) -> int:
    window = _ZSTD_MIN_WINDOW
    while window < max_decoded and window < _ZSTD_MAX_WINDOW:
        window <<= 1
    return window


def _unzstd(data: bytes, max_decoded: int) -> bytes:
    frames = _zstd_frames(data)
    dctx = zstandard.ZstdDecompressor(max_window_size=_zstd_window(max_decoded))
    out: list[bytes] = []
    size = 0
    try:
        for frame in frames:
            declared = zstandard.frame_content_size(frame)
            if declared >= 0:
                if size + declared > max_decoded:
                    raise _too_large(max_decoded)
                piece = dctx.decompress(frame)
                size += len(piece)
                out.append(piece)
                continue
            reader = dctx.stream_reader(frame, read_size=_READ_SIZE)
            while True:
                piece = reader.read(min(max_decoded - size + 1, _READ_SIZE))
                if not piece:
                    break
                size += len(piece)
                if size > max_decoded:
                    raise _too_large(max_decoded)
                out.append(piece)
    except zstandard.ZstdError as exc:
        if "too much memory" in str(exc):
            raise invalid_request(
                "Request body too large: its zstd window exceeds the decoded size limit "
                f"of {max_decoded} bytes.",
                code="request_too_large",
                status=413,
            ) from None
        raise _corrupt("zstd", str(exc)) from None
    return out[0] if len(out) == 1 else b"".join(out)


class _BadConstant(ValueError):
    pass


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _wide_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


_decode = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
).decode
_decode_wide = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_reject_constant,
    parse_int=_wide_int,
).decode


def _bad_json(what: str) -> OpenAIError:
    return invalid_request(f"We could not parse the JSON body of your request: {what}.{_JSON_HINT}")


def _parse(text: str) -> Any:
    try:
        return _decode(text)
    except (json.JSONDecodeError, _BadConstant, _DuplicateKey):
        raise
    except ValueError:
        # An integer longer than Python's int/str conversion limit: parse it as a float.
        return _decode_wide(text)


def parse_json_object(data: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object; raise OpenAIError(400) otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_json(f"invalid UTF-8 at byte {exc.start}") from None
    bom = 3 if text.startswith("\ufeff") else 0
    try:
        obj = _parse(text[1:] if bom else text)
    except json.JSONDecodeError as exc:
        offset = bom + len(exc.doc[: exc.pos].encode("utf-8", "surrogatepass"))
        raise _bad_json(f"{exc.msg} at byte {offset}") from None
    except _BadConstant as exc:
        raise _bad_json(f"{exc.args[0]} is not a valid JSON value") from None
    except _DuplicateKey as exc:
        raise _bad_json(f"duplicate key {exc.args[0]!r} in an object") from None
    except RecursionError:
        raise _bad_json("nesting is too deep") from None
    if not isinstance(obj, dict):
        raise _bad_json(f"the top-level value must be an object, not {json_kind(obj)}")
    return obj


def json_kind(value: Any) -> str:
    """How OpenAI's error messages name the type of a JSON value."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _finite(value: Any) -> bool:
    """False if `value` holds an infinite float anywhere (`1e999` parses to one)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
"""`json.dumps` with these options builds a new encoder on every call; this one is reused."""


def encode_json(obj: dict[str, Any]) -> bytes:
    """Serialise a (rewritten) request body compactly as UTF-8 JSON."""
    try:
        text = _COMPACT.encode(obj)
    except ValueError:
        param = next((k for k, v in obj.items() if not _finite(v)), None)
        raise invalid_request(
            f"Invalid value for '{param}': a number is out of range (beyond a double)."
            if param
            else "A number in the request is out of range (beyond a double).",
            param=param,
            code="number_out_of_range",
        ) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates from \\ud800-style escapes: keep them as escapes.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
