from __future__ import annotations

import json

import pytest

from extproc.wire.sse import SSEEvent, SSEParser


def _event(kind: str, **fields: object) -> bytes:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


STREAM = b"".join(
    [
        b": keep-alive\n\n",
        _event("response.created", response={"id": "resp_1", "model": "gpt-5-codex"}),
        _event("response.output_text.delta", delta="Grüße ", sequence_number=1),
        _event("response.output_text.delta", delta="日本語 😀", sequence_number=2),
        b"id: 7\nretry: 1500\n",
        b'data: {"multi":\ndata: "line"}\n\n',
        _event("response.completed", response={"status": "completed"}),
    ]
)


def _feed_all(parser: SSEParser, chunks: list[bytes]) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def _whole(stream: bytes) -> list[SSEEvent]:
    return SSEParser().feed(stream)


def test_realistic_stream() -> None:
    events = _whole(STREAM)
    assert [e.event for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        None,
        "response.completed",
    ]
    assert json.loads(events[2].data)["delta"] == "日本語 😀"
    assert events[3].data == '{"multi":\n"line"}'


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_split_point_gives_the_same_events(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    expected = _whole(stream)
    assert len(expected) == 5
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        assert _feed_all(parser, [stream[:cut], stream[cut:]]) == expected, cut
        assert not parser.pending


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_byte_by_byte_gives_the_same_events(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    parser = SSEParser()
    assert _feed_all(parser, [stream[i : i + 1] for i in range(len(stream))]) == _whole(stream)


def test_three_way_splits_around_multibyte_characters() -> None:
    expected = _whole(STREAM)
    start = STREAM.index("日".encode())
    for a in range(start - 3, start + 12):
        for b in range(a, start + 14):
            chunks = [STREAM[:a], STREAM[a:b], STREAM[b:]]
            assert _feed_all(SSEParser(), chunks) == expected


def test_mixed_line_endings() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\rdata: d\r\r"
    assert _whole(stream) == [SSEEvent(None, "a\nb\nc"), SSEEvent("x", "d")]


def test_field_parsing_rules() -> None:
    parser = SSEParser()
    events = parser.feed(
        b": comment\n"
        b"data:no space\n"
        b"data:  two spaces\n"
        b"data\n"
        b"unknown: field\n"
        b"\n"
        b"event: only an event name\n"
        b"\n"
        b"data:\n"
        b"\n"
        b"id: abc\n"
        b"retry: 12x\n"
        b"retry: 3000\n"
        b"id: bad\0id\n"
    )
    assert events == [SSEEvent(None, "no space\n two spaces\n"), SSEEvent(None, "")]
    assert parser.last_event_id == "abc"
    assert parser.retry == 3000


def test_event_name_does_not_leak_into_the_next_event() -> None:
    events = _whole(b"event: a\ndata: 1\n\ndata: 2\n\n")
    assert events == [SSEEvent("a", "1"), SSEEvent(None, "2")]


def test_leading_bom_is_stripped_even_when_split() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    for cut in range(len(stream) + 1):
        assert _feed_all(SSEParser(), [stream[:cut], stream[cut:]]) == [SSEEvent(None, "x")]
    assert _feed_all(SSEParser(), [b"\xef", b"\xbb", b"\xbf", b"data: y\n\n"]) == [
        SSEEvent(None, "y")
    ]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert _whole(b"data: a\xffb\n\n") == [SSEEvent(None, "a\ufffdb")]


def test_unterminated_final_event_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: done\n\ndata: cut off") == [SSEEvent(None, "done")]
    assert parser.pending
    assert parser.close() == []
    parser = SSEParser()
    assert parser.feed(b"data: no blank line\n") == []
    assert parser.pending
    assert parser.close() == []


def test_not_pending_after_complete_events_or_comments() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\n\n: trailing comment\n")
    assert not parser.pending


def test_spans_cover_exactly_each_event() -> None:
    for newline in (b"\n", b"\r\n", b"\r"):
        stream = STREAM.replace(b"\n", newline)
        parser = SSEParser()
        spans = []
        for i in range(0, len(stream), 7):
            spans.extend(parser.feed_spans(stream[i : i + 7]))
        assert [event for event, _, _ in spans] == _whole(stream)
        previous_end = 0
        for event, start, end in spans:
            assert start >= previous_end
            assert SSEParser().feed(stream[start:end]) == [event]
            previous_end = end


def test_whole_events_per_chunk_fast_path() -> None:
    parser = SSEParser()
    events = [_event("response.output_text.delta", delta=str(i)) for i in range(100)]
    seen = [parser.feed(chunk) for chunk in events]
    assert all(len(batch) == 1 for batch in seen)
    assert parser.boundary == parser.consumed == sum(map(len, events))
