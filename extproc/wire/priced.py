"""The passthrough endpoints priced from their answer's usage: what their requests say.

`POST /v1/responses/compact` and `POST /v1/images/generations` cost tokens the answer
reports, so they are held against the budget before they are forwarded, like the metered
four. Each is an `Endpoint` here, so the data plane parses, validates and counts them with
the very code it uses for `/v1/responses` (`metering.parse_request`): the request's model,
its input tokens, and how many outputs it asks for. Neither states an output cap the
provider enforces (`output_cap` stays None): the hold's output side is the policy's
`passthrough.output_ceiling` for the endpoint, per output.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from extproc.wire.common import (
    NoStream,
    RequestFacts,
    load_json,
    model_of,
    optional_count,
    optional_str,
    require_model,
    wrong_type,
)
from extproc.wire.errors import invalid_request
from extproc.wire.responses import Responses, response_usage
from extproc.wire.sse import SSEParser
from extproc.wire.usage import Usage

IMAGES_DEFAULT_MODEL = "dall-e-2"
"""What OpenAI serves an image generation that names no model."""
MAX_IMAGES = 10


class _PricedPassthrough:
    """What the two priced passthrough endpoints share: no stream to meter, usage as
    the Responses API reports it, and nothing rewritten on the way up."""

    def prepare_upstream(self, body: dict[str, Any], facts: RequestFacts) -> bool:
        return False

    def usage_from_json(self, body: bytes) -> tuple[Usage | None, str | None]:
        obj = load_json(body)
        if not isinstance(obj, dict):
            return None, None
        return response_usage(obj.get("usage")), model_of(obj)

    def stream_meter(self, *, strip_usage_chunk: bool) -> NoStream:
        return NoStream()


class Compact(_PricedPassthrough):
    """`POST /v1/responses/compact`: a Responses-shaped input, counted like one."""

    _input: ClassVar[Responses] = Responses()

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = require_model(body)
        value = body.get("input")
        if value is not None and not isinstance(value, str | list):
            raise wrong_type("input", "a string or an array", value)
        return RequestFacts(
            model=model,
            stream=False,
            output_cap=None,
            prompt_cache_key=optional_str(body.get("prompt_cache_key"), "prompt_cache_key"),
            previous_response_id=optional_str(
                body.get("previous_response_id"), "previous_response_id"
            ),
            reasoning_effort=None,
            has_tools=False,
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        return self._input.input_texts(body)

    def input_overhead(self, body: dict[str, Any]) -> int:
        return self._input.input_overhead(body)


class ImageGenerations(_PricedPassthrough):
    """`POST /v1/images/generations`: a text prompt in, `n` images out (image tokens)."""

    def facts(self, body: dict[str, Any]) -> RequestFacts:
        model = body.get("model", IMAGES_DEFAULT_MODEL)
        if model is None:
            model = IMAGES_DEFAULT_MODEL
        elif not isinstance(model, str):
            raise wrong_type("model", "a string", model)
        elif not model:
            raise invalid_request(
                "Invalid value for 'model': it must not be empty.",
                param="model",
                code="invalid_value",
            )
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise wrong_type("prompt", "a string", prompt)
        count = optional_count(body, "n", minimum=1, maximum=MAX_IMAGES)
        stream = body.get("stream")
        return RequestFacts(
            model=model,
            stream=stream is True,
            output_cap=None,
            prompt_cache_key=None,
            previous_response_id=None,
            reasoning_effort=None,
            has_tools=False,
            choices=count or 1,
        )

    def input_texts(self, body: dict[str, Any]) -> Iterator[str]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            yield prompt

    def input_overhead(self, body: dict[str, Any]) -> int:
        return 0


def final_answer(body: bytes) -> Any:
    """A priced call's answer as JSON: the object itself, or, for a stream (an image
    generation with `stream: true` ends with `image_generation.completed`), the payload of
    the last event that carries `usage`. None when there is neither."""
    answer = load_json(body)
    if answer is not None or not body.lstrip().startswith((b"event:", b"data:")):
        return answer
    last = None
    for event in SSEParser().feed(body + b"\n\n"):
        payload = load_json(event.data)
        if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
            last = payload
    return last
