"""End to end: SIGTERM lets in-flight streams finish, and their records still reach the ledger."""

from __future__ import annotations

import signal
import threading

import httpx
import redis

from extproc.devstack.stack import temporary_stack
from tests.conftest import METERING_ONLY, SLOW_STREAM, SLOW_STREAM_HEADERS, wait_record

RID = "x-extproc-request-id"


def test_sigterm_drains_an_in_flight_stream_and_records_it() -> None:
    with temporary_stack(sidecar_env=METERING_ONLY) as stack:
        sidecar = stack.children["sidecar"]
        first_event = threading.Event()
        lines: list[str] = []
        headers: dict[str, str] = {}

        def stream() -> None:
            body, hdrs = SLOW_STREAM, SLOW_STREAM_HEADERS
            with httpx.stream(
                "POST", f"{stack.base_url}/chat/completions", json=body, headers=hdrs, timeout=30
            ) as resp:
                headers.update(resp.headers)
                for line in resp.iter_lines():
                    lines.append(line)
                    first_event.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first_event.wait(15)
        sidecar.proc.send_signal(signal.SIGTERM)  # mid-stream
        client.join(30)
        assert not client.is_alive()
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert sidecar.proc.wait(30) == 0
        r = redis.Redis.from_url(stack.redis_url)
        try:
            rec = wait_record(r, headers[RID])
        finally:
            r.close()
        assert rec["outcome"] == "completed"
        assert rec["estimated"] is False
        assert rec["output_tokens"] > 0
