"""The reply builders: each names its phase even when it changes nothing, and carries
exactly the header changes asked for (they are built in place, field by field)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from extproc.dataplane import envoy_msgs as msgs

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _sent(mutation: msgs.pb.HeaderMutation) -> list[tuple[str, bytes, int]]:
    return [(o.header.key, o.header.raw_value, o.append_action) for o in mutation.set_headers]


def test_a_reply_without_changes_still_answers_its_phase() -> None:
    replies = {
        "request_headers": msgs.forward_request_headers({}, []),
        "request_body": msgs.replace_request_body(None, {}),
        "response_headers": msgs.response_headers({}, stream=False),
        "response_body": msgs.response_body_headers({}),
    }
    for phase, reply in replies.items():
        wire = msgs.pb.ProcessingResponse.FromString(reply.SerializeToString())
        assert wire.WhichOneof("response") == phase


def test_headers_are_set_overwriting_and_removed_as_asked() -> None:
    reply = msgs.response_headers(
        {"x-extproc-workspace": "acme", "x-extproc-model": "gpt-5\u00e9"},
        stream=True,
        remove=("content-length",),
    )
    wire = msgs.pb.ProcessingResponse.FromString(reply.SerializeToString())
    mutation = wire.response_headers.response.header_mutation
    assert _sent(mutation) == [
        ("x-extproc-workspace", b"acme", OVERWRITE),
        ("x-extproc-model", b"gpt-5%C3%A9", OVERWRITE),
    ]
    assert list(mutation.remove_headers) == ["content-length"]
    assert wire.mode_override.response_body_mode == msgs.ProcessingMode.STREAMED


def test_request_body_replacement_carries_body_headers_and_route_flag() -> None:
    reply = msgs.replace_request_body(
        b'{"model":"m"}', {"content-length": "13"}, ["x-old"], clear_route_cache=True
    )
    common = msgs.pb.ProcessingResponse.FromString(reply.SerializeToString()).request_body.response
    assert common.status == msgs.pb.CommonResponse.CONTINUE_AND_REPLACE
    assert common.body_mutation.body == b'{"model":"m"}'
    assert common.clear_route_cache
    assert _sent(common.header_mutation) == [("content-length", b"13", OVERWRITE)]
    assert list(common.header_mutation.remove_headers) == ["x-old"]


def test_immediate_answer_has_status_json_type_and_extra_headers() -> None:
    reply = msgs.immediate(429, b'{"error":{}}', {"retry-after": "3"})
    answer = msgs.pb.ProcessingResponse.FromString(reply.SerializeToString()).immediate_response
    assert answer.status.code == 429
    assert answer.body == b'{"error":{}}'
    assert answer.details == "extproc"
    assert _sent(answer.headers) == [
        ("content-type", b"application/json", OVERWRITE),
        ("retry-after", b"3", OVERWRITE),
    ]
