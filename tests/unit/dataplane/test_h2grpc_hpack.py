"""HPACK and Huffman decoding (RFC 7541) and grpc-message encoding, as pure functions."""

from __future__ import annotations

import random

import hpack
import pytest

from extproc.dataplane.h2grpc.hpack import HeaderDecoder, HeaderListTooLarge, HpackError, encode_int
from extproc.dataplane.h2grpc.huffman import (
    CODES,
    LENGTHS,
    HuffmanError,
    huffman_decode,
    huffman_encode,
)
from extproc.dataplane.h2grpc.responses import percent_encode

# -- HPACK and Huffman --------------------------------------------------------------------

# RFC 7541 Appendix C: C.3 requests without Huffman, C.4 with Huffman (4096-byte table),
# C.6 responses with Huffman and a 256-byte table, where entries get evicted.
RFC_REQUESTS = [
    (":method", "GET"),
    (":scheme", "http"),
    (":path", "/"),
    (":authority", "www.example.com"),
]
RFC_C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
RFC_C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
RFC_C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
    "63c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
    "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


def _pairs(block: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode(), v.decode()) for n, v in block]


@pytest.mark.parametrize("blocks", [RFC_C3, RFC_C4], ids=["plain", "huffman"])
def test_hpack_rfc_request_examples(blocks: list[str]) -> None:
    decoder = HeaderDecoder()
    first, second, third = (decoder.decode(bytes.fromhex(b)) for b in blocks)
    assert _pairs(first) == RFC_REQUESTS
    assert _pairs(second) == [*RFC_REQUESTS, ("cache-control", "no-cache")]
    assert _pairs(third) == [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ]
    assert decoder.table_size == 164
    assert _pairs(decoder.table) == [
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ]


def test_hpack_rfc_response_examples_evict() -> None:
    decoder = HeaderDecoder(256)
    date = "Mon, 21 Oct 2013 20:13:21 GMT"
    loc = "https://www.example.com"
    first, second, third = (decoder.decode(bytes.fromhex(b)) for b in RFC_C6)
    assert _pairs(first) == [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", date),
        ("location", loc),
    ]
    assert _pairs(second) == [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", date),
        ("location", loc),
    ]
    cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
    assert _pairs(third) == [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", loc),
        ("content-encoding", "gzip"),
        ("set-cookie", cookie),
    ]
    assert decoder.table_size == 215
    assert [n for n, _ in _pairs(decoder.table)] == ["set-cookie", "content-encoding", "date"]


def test_huffman_code_is_a_complete_prefix_code() -> None:
    assert len(LENGTHS) == 257
    assert sum(2.0**-n for n in LENGTHS) == 1.0
    assert CODES[256] == (1 << 30) - 1  # EOS: thirty ones
    assert (CODES[ord("0")], LENGTHS[ord("0")]) == (0, 5)
    every_byte = bytes(range(256)) * 3
    assert huffman_decode(huffman_encode(every_byte)) == every_byte
    assert huffman_decode(b"") == b""


@pytest.mark.parametrize(
    "raw",
    [
        bytes([0x1F, 0xFF]),  # "a" (00011) then 11 bits of padding: more than 7
        bytes([0x18]),  # "a" then padding 000: not a prefix of EOS
        b"\xff\xff\xff\xfc",  # EOS (thirty ones) inside the string
    ],
    ids=["long-padding", "zero-padding", "eos"],
)
def test_huffman_rejects_bad_padding_and_eos(raw: bytes) -> None:
    with pytest.raises(HuffmanError):
        huffman_decode(raw)


@pytest.mark.parametrize(
    "block",
    [
        b"\xff\x80\x80\x80\x80\x80\x01",  # integer overflow
        b"\xbe",  # dynamic index 62 with an empty table
        b"\x80",  # index 0
        b"\x40\x05ab",  # string shorter than its length
        b"\x3f\xe2\x1f",  # table size update to 4097, above the 4096 limit
        b"\x82\x20",  # size update after a header field
    ],
)
def test_hpack_rejects_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HpackError):
        HeaderDecoder().decode(block)


def test_hpack_size_update_shrinks_table_and_integers_round_trip() -> None:
    decoder = HeaderDecoder()
    decoder.decode(encode_int(0, 6, 0x40) + b"\x03abc\x03def")
    assert decoder.table_size == 38
    decoder.decode(b"\x20")
    assert decoder.table_size == 0
    assert decoder.table == []
    for value in (0, 30, 31, 127, 128, 1337, 1 << 20):
        block = encode_int(value, 5, 0x20)
        assert HeaderDecoder(1 << 21).decode(block) == []
    assert encode_int(1337, 5) == bytes([31, 154, 10])  # RFC 7541 C.1.2


def test_grpc_message_percent_encoding() -> None:
    assert percent_encode("plain text") == b"plain text"
    assert percent_encode("50% é\n") == b"50%25 %C3%A9%0A"


# -- the `hpack` package's encoder as an oracle -----------------------------------------

# Names and values a real peer sends, plus bytes that push Huffman to its long codes.
_NAMES = [
    b":path",
    b":authority",
    b"content-type",
    b"te",
    b"grpc-timeout",
    b"user-agent",
    b"x-request-id",
    b"x-envoy-expected-rq-timeout-ms",
    b"authorization",
    b"cookie",
]
_ALPHABET = bytes(range(256))


def _random_value(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice([b"", b"application/grpc", b"trailers", b"/a/b", b"gzip"])
    if kind < 0.8:
        return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789-_/.")
                     for _ in range(rng.randrange(0, 300)))  # fmt: skip
    return bytes(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 80)))


def _random_headers(rng: random.Random) -> list[hpack.HeaderTuple]:
    headers: list[hpack.HeaderTuple] = []
    for _ in range(rng.randrange(1, 25)):
        name = rng.choice(_NAMES) if rng.random() < 0.7 else _random_value(rng).lower() or b"x"
        value = _random_value(rng)
        cls = hpack.NeverIndexedHeaderTuple if rng.random() < 0.1 else hpack.HeaderTuple
        headers.append(cls(name, value))
    return headers


@pytest.mark.parametrize("seed", range(8))
def test_hpack_decoder_agrees_with_the_hpack_package_encoder(seed: int) -> None:
    """Hundreds of blocks from an independent encoder over one connection's life: Huffman
    on and off, indexed and never-indexed fields, table evictions and size updates."""
    rng = random.Random(seed)
    encoder = hpack.Encoder()
    ours = HeaderDecoder()
    for _ in range(150):
        if rng.random() < 0.1:
            encoder.header_table_size = rng.choice([0, 64, 256, 1024, 4096])
        headers = _random_headers(rng)
        block = encoder.encode(headers, huffman=rng.random() < 0.7)
        assert ours.decode(block) == [(bytes(n), bytes(v)) for n, v in headers]
        assert ours.table == [(bytes(n), bytes(v)) for n, v in encoder.header_table.dynamic_entries]


def test_hpack_header_list_limit_keeps_the_table_in_step() -> None:
    """Over the limit: an error for that block only; the next block still decodes, because
    the fields past the limit were decoded (and indexed) all the same."""
    encoder = hpack.Encoder()
    ours = HeaderDecoder()
    big = [(b"x-big-%02d" % i, b"v" * 100) for i in range(20)]  # 20 x (8 + 100 + 32) bytes
    with pytest.raises(HeaderListTooLarge):
        ours.decode(encoder.encode(big), max_list_size=1000)
    again = encoder.encode(big)  # all indexed references now: 20 bytes for 2,800
    assert len(again) == 20
    assert ours.decode(again, max_list_size=2800) == big
    with pytest.raises(HeaderListTooLarge):
        ours.decode(again, max_list_size=2799)
