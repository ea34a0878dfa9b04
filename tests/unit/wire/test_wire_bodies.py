from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import zstandard

from extproc.wire.bodies import SUPPORTED_ENCODINGS, decode_body, encode_json, parse_json_object
from extproc.wire.errors import OpenAIError

BODY = json.dumps(
    {"model": "gpt-5-codex", "input": "Résumé ✓ — " + "word " * 2000, "stream": True},
    ensure_ascii=False,
).encode()
MAX = 1 << 20


def _deflate_raw(data: bytes) -> bytes:
    comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return comp.compress(data) + comp.flush()


def _zstd_unsized(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


def _error(raw: bytes, coding: str | None, max_decoded: int = MAX) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        decode_body(raw, coding, max_decoded=max_decoded)
    return info.value


# --- decode_body ----------------------------------------------------------------------


def test_supported_encodings() -> None:
    assert frozenset({"identity", "gzip", "x-gzip", "deflate", "zstd"}) == SUPPORTED_ENCODINGS


@pytest.mark.parametrize("coding", [None, "", "identity", " Identity "])
def test_identity_returns_the_same_bytes(coding: str | None) -> None:
    assert decode_body(BODY, coding, max_decoded=MAX) is BODY


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _deflate_raw),
        ("zstd", zstandard.ZstdCompressor().compress),
        ("zstd", _zstd_unsized),
    ],
)
def test_each_encoding(coding: str, encode: Callable[[bytes], bytes]) -> None:
    raw = encode(BODY)
    assert decode_body(raw, coding, max_decoded=MAX) == BODY


def test_zstd_frame_without_content_size_is_streamed() -> None:
    raw = _zstd_unsized(BODY)
    assert zstandard.frame_content_size(raw) == -1
    assert decode_body(raw, "zstd", max_decoded=MAX) == BODY


def test_zstd_streaming_compressor_output() -> None:
    comp = zstandard.ZstdCompressor(level=3).compressobj()
    raw = b"".join(comp.compress(BODY[i : i + 1000]) for i in range(0, len(BODY), 1000))
    raw += comp.flush()
    assert decode_body(raw, "zstd", max_decoded=MAX) == BODY


def test_zstd_several_frames_and_skippable_frames() -> None:
    half = len(BODY) // 2
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    raw = zstandard.ZstdCompressor().compress(BODY[:half]) + skippable + _zstd_unsized(BODY[half:])
    assert decode_body(raw, "zstd", max_decoded=MAX) == BODY


def test_gzip_with_several_members() -> None:
    raw = gzip.compress(BODY[:100]) + gzip.compress(BODY[100:])
    assert decode_body(raw, "gzip", max_decoded=MAX) == BODY


@pytest.mark.parametrize(
    ("coding", "layers"),
    [
        ("gzip, zstd", [gzip.compress, _zstd_unsized]),
        ("deflate,gzip", [zlib.compress, gzip.compress]),
        ("zstd, identity, gzip", [_zstd_unsized, gzip.compress]),
        (" x-gzip ,  ZSTD ", [gzip.compress, zstandard.ZstdCompressor().compress]),
    ],
)
def test_stacked_codings_are_undone_last_first(
    coding: str, layers: list[Callable[[bytes], bytes]]
) -> None:
    raw = BODY
    for layer in layers:
        raw = layer(raw)
    assert decode_body(raw, coding, max_decoded=MAX) == BODY


@pytest.mark.parametrize("coding", ["br", "gzip, br", "compress", "zstd;q=1"])
def test_unsupported_encoding_is_415(coding: str) -> None:
    err = _error(gzip.compress(BODY), coding)
    assert (err.status, err.code, err.param, err.type) == (
        415,
        "unsupported_content_encoding",
        None,
        "invalid_request_error",
    )


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("coding", "raw"),
    [
        ("gzip", _flip(gzip.compress(BODY), 40)),
        ("gzip", gzip.compress(BODY)[:-10]),
        ("gzip", gzip.compress(BODY) + b"trailing junk"),
        ("gzip", b"definitely not gzip"),
        ("deflate", zlib.compress(BODY)[:-3]),
        ("deflate", zlib.compress(BODY) + b"junk"),
        ("zstd", _flip(zstandard.ZstdCompressor(write_checksum=True).compress(BODY), 30)),
        ("zstd", _flip(zstandard.ZstdCompressor(write_checksum=True).compress(BODY), -2)),
        ("zstd", zstandard.ZstdCompressor().compress(BODY)[:-1]),
        ("zstd", _zstd_unsized(BODY)[:-7]),
        ("zstd", _zstd_unsized(BODY) + b"junk"),
        ("zstd", b"\x28\xb5\x2f\xfd"),
        ("zstd", b"not zstd at all"),
    ],
)
def test_corrupt_or_truncated_data_is_400(coding: str, raw: bytes) -> None:
    err = _error(raw, coding)
    assert err.status == 400
    assert err.code == "invalid_content_encoding"
    assert coding in err.message


def test_empty_body_stays_empty() -> None:
    assert decode_body(b"", "gzip, zstd", max_decoded=MAX) == b""


def test_limit_is_inclusive() -> None:
    payload = b"a" * 5000
    for coding, raw in [("gzip", gzip.compress(payload)), ("zstd", _zstd_unsized(payload))]:
        assert decode_body(raw, coding, max_decoded=5000) == payload
        assert _error(raw, coding, max_decoded=4999).status == 413
    assert _error(payload, None, max_decoded=4999).code == "request_too_large"


def _gzip_bomb(size: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    return b"".join(comp.compress(block) for _ in range(size >> 20)) + comp.flush()


def _zstd_bomb(size: int) -> bytes:
    comp = zstandard.ZstdCompressor(level=1).compressobj()
    block = b"\0" * (1 << 20)
    return b"".join(comp.compress(block) for _ in range(size >> 20)) + comp.flush()


def _deflate_bomb(size: int) -> bytes:
    comp = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    return b"".join(comp.compress(block) for _ in range(size >> 20)) + comp.flush()


@pytest.mark.parametrize(
    ("coding", "make"),
    [("gzip", _gzip_bomb), ("zstd", _zstd_bomb), ("deflate", _deflate_bomb)],
)
def test_zip_bomb_stops_at_the_cap(coding: str, make: Callable[[int], bytes]) -> None:
    bomb = make(64 << 20)
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        err = _error(bomb, coding, max_decoded=MAX)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.status, err.code) == (413, "request_too_large")
    assert peak < MAX + MAX // 2 + len(bomb)


def test_zstd_declared_size_over_cap_is_refused_before_decoding() -> None:
    raw = zstandard.ZstdCompressor().compress(b"\0" * (4 * MAX))
    assert zstandard.frame_content_size(raw) == 4 * MAX
    assert _error(raw, "zstd").status == 413


def _hand_made_zstd(window_exponent: int, payload: bytes) -> bytes:
    """A frame with no content size, the given window, and one raw block."""
    block = ((len(payload) << 3) | 1).to_bytes(3, "little")
    return b"\x28\xb5\x2f\xfd" + b"\x00" + bytes([window_exponent << 3]) + block + payload


def test_zstd_window_larger_than_the_cap_is_refused() -> None:
    raw = _hand_made_zstd(17, b"hello")  # declares a 128 MiB window
    assert _error(raw, "zstd", max_decoded=MAX).status == 413
    assert decode_body(raw, "zstd", max_decoded=128 << 20) == b"hello"
    assert decode_body(_hand_made_zstd(10, b"hello"), "zstd", max_decoded=MAX) == b"hello"


# --- parse_json_object ----------------------------------------------------------------


def _json_error(data: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_json_object(data)
    err = info.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", None)
    assert err.message.startswith("We could not parse the JSON body of your request: ")
    return err


def test_parses_an_object() -> None:
    assert parse_json_object(BODY)["model"] == "gpt-5-codex"


def test_utf8_bom_is_accepted() -> None:
    assert parse_json_object(b"\xef\xbb\xbf" + BODY)["stream"] is True


def test_bom_counts_in_error_offsets() -> None:
    assert "at byte 9" in _json_error(b'\xef\xbb\xbf{"a": }').message


def test_invalid_utf8_is_rejected_with_offset() -> None:
    err = _json_error(b'{"model": "gpt\xff"}')
    assert "invalid UTF-8 at byte 14" in err.message


def test_utf16_is_not_sniffed() -> None:
    _json_error('{"model": "x"}'.encode("utf-16"))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"[1, 2]", "an array"),
        (b'"text"', "a string"),
        (b"3", "an integer"),
        (b"2.5", "a decimal number"),
        (b"true", "a boolean"),
        (b"null", "null"),
    ],
)
def test_top_level_must_be_an_object(data: bytes, kind: str) -> None:
    assert f"must be an object, not {kind}" in _json_error(data).message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_rejected(literal: bytes) -> None:
    err = _json_error(b'{"temperature": ' + literal + b"}")
    assert literal.decode() in err.message


@pytest.mark.parametrize(
    "data",
    [
        b'{"model": "gpt-4o-mini", "model": "gpt-5"}',
        b'{"input": [{"role": "user", "content": "a"}, {"role": "user", "role": "system"}]}',
        b'{"a": {"b": {"c": {"d": 1, "d": 1}}}}',
    ],
)
def test_duplicate_keys_are_rejected_at_any_depth(data: bytes) -> None:
    assert "duplicate key" in _json_error(data).message


def test_same_key_in_different_objects_is_fine() -> None:
    body = parse_json_object(b'{"a": {"k": 1}, "b": {"k": 2}, "c": [{"k": 3}, {"k": 4}]}')
    assert body["c"][1]["k"] == 4


def test_huge_numbers_are_accepted() -> None:
    digits = "1234567890" * 30
    body = parse_json_object(f'{{"a": {digits}, "b": 1e308, "c": -1e400}}'.encode())
    assert body["a"] == int(digits)
    assert body["b"] == 1e308
    assert body["c"] == float("-inf")
    longest = parse_json_object(b'{"a": ' + b"9" * 6000 + b"}")
    assert longest["a"] == float("inf")


def test_lone_surrogate_escapes_parse() -> None:
    body = parse_json_object(b'{"text": "\\ud800 and \\udfff", "pair": "\\ud83d\\ude00"}')
    assert body["text"] == "\ud800 and \udfff"
    assert body["pair"] == "😀"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"", "Expecting value at byte 0"),
        (b'{"model": "x",}', "at byte 14"),
        ('{"é": 1 x}'.encode(), "delimiter at byte 9"),
        (b'{"a": 1} {"b": 2}', "Extra data at byte 9"),
        (b'{"a": "line\nbreak"}', "Invalid control character"),
    ],
)
def test_syntax_errors_report_byte_offsets(data: bytes, where: str) -> None:
    assert where in _json_error(data).message


def test_deep_nesting_is_a_400_not_a_crash() -> None:
    err = _json_error(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "nesting" in err.message


# --- encode_json ----------------------------------------------------------------------


def test_encode_json_is_compact_utf8() -> None:
    assert encode_json({"a": [1, 2], "é": "✓"}) == '{"a":[1,2],"é":"✓"}'.encode()


def test_encode_json_round_trips_a_parsed_body() -> None:
    assert parse_json_object(encode_json(parse_json_object(BODY))) == parse_json_object(BODY)


def test_encode_json_keeps_lone_surrogates_as_escapes() -> None:
    out = encode_json({"text": "\ud800", "other": "é"})
    assert out == b'{"text":"\\ud800","other":"\\u00e9"}'
    assert parse_json_object(out) == {"text": "\ud800", "other": "é"}


def test_encode_json_refuses_to_write_non_json_numbers() -> None:
    body = parse_json_object(b'{"temperature": 1e999}')
    with pytest.raises(OpenAIError) as info:
        encode_json(body)
    assert info.value.status == 400


# --- OpenAIError ----------------------------------------------------------------------


def test_error_body_has_openai_shape() -> None:
    err = OpenAIError(400, "Bad “thing”", "invalid_request_error", param="model", code="x")
    assert json.loads(err.body()) == {
        "error": {
            "message": "Bad “thing”",
            "type": "invalid_request_error",
            "param": "model",
            "code": "x",
        }
    }
    none = OpenAIError(500, "m", "server_error")
    assert json.loads(none.body())["error"]["param"] is None


def test_error_is_an_exception_and_a_value() -> None:
    err = OpenAIError(413, "too big", "invalid_request_error", code="request_too_large")
    with pytest.raises(OpenAIError) as info:
        raise err
    assert info.value == OpenAIError(
        413, "too big", "invalid_request_error", None, "request_too_large"
    )
    assert str(err) == "too big"
    assert len({err, info.value}) == 1
