"""One passthrough call's phases: an OpenAI endpoint other than the metered four.

The `Exchange` authenticates the caller and classifies the path; for a passthrough call it
hands each later ext_proc message here. This side only collects what the record needs (the
status, and for calls priced from their answer the request's model and the response body);
`extproc.metering.passthrough` turns that into the record. A priced call of a governed
caller `holds`: its whole request body is read, counted, priced and reserved (`hold`) like
a metered request before the `Exchange` lets it go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from extproc.dataplane import envoy_msgs as msgs
from extproc.dataplane.deps import Deps
from extproc.governance import guard
from extproc.governance.budget import Decision, Plan, plan_request
from extproc.governance.keys import Identity
from extproc.governance.policy import model_key
from extproc.metering.decisions import parse_request, utf8_text
from extproc.metering.passthrough import PassthroughSeen, request_model
from extproc.metering.worstcase import is_priced
from extproc.wire.endpoints import Endpoint
from extproc.wire.errors import OpenAIError
from extproc.wire.spec import Pricing

_STATUS = frozenset({":status"})


@dataclass(frozen=True, slots=True)
class Held:
    """How holding a priced call went: bad input, a refusal, or a reservation's decision."""

    bad_input: OpenAIError | None = None
    refusal: OpenAIError | None = None
    plan: Plan | None = None
    decision: Decision | None = None
    ask: Callable[[], guard.Ask] | None = None  # what it would hold, for a denial's text


class PassthroughCall:
    __slots__ = ("_chunks", "holds", "seen")

    def __init__(self, seen: PassthroughSeen, *, governed: bool = False) -> None:
        self.seen = seen
        self._chunks: list[bytes] = []
        # Held against the budget before it is forwarded: priced, and a caller to charge.
        self.holds = governed and self.priced

    @property
    def spec(self) -> Endpoint:
        """How a priced call's request is read (see `extproc.wire.priced`)."""
        spec = self.seen.target.spec
        assert spec is not None and spec.reader is not None
        return spec.reader

    @property
    def priced(self) -> bool:
        spec = self.seen.target.spec
        return spec is not None and spec.pricing is Pricing.USAGE

    def forward(
        self, add: dict[str, str], remove: list[str], *, json_body: bool
    ) -> msgs.ProcessingResponse:
        if self.priced:
            remove.append("accept-encoding")  # the answer's usage must be readable
        return msgs.forward_passthrough(
            add,
            remove,
            read_request=self.holds or (self.priced and json_body),
            read_response=self.priced,
        )

    def on_request_body(self, msg: msgs.pb.HttpBody) -> bytes | None:
        """Only priced requests are read: their `model` names the price row.

        Returns the whole body of a call that `holds` (the exchange reserves for it), None
        otherwise or while more is to come.
        """
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        if self.holds:
            return body
        self.seen.request_model = request_model(body)
        return None

    def on_response_headers(self, msg: msgs.pb.HttpHeaders) -> bool:
        """Note the status; True when the call is complete (nothing more will be read)."""
        try:
            self.seen.status = int(msgs.header_map(msg, _STATUS).get(":status", "0"))
        except ValueError:
            self.seen.status = 0
        return msg.end_of_stream or not self.priced

    def on_response_body(self, msg: msgs.pb.HttpBody) -> bool:
        """Collect the buffered answer; True once it is whole."""
        self._chunks.append(msg.body)
        if not msg.end_of_stream:
            return False
        self.seen.response_body = b"".join(self._chunks)
        self._chunks.clear()
        return True

    async def hold(
        self,
        deps: Deps,
        identity: Identity,
        raw: bytes,
        content_encoding: str,
        *,
        orphan: Callable[[Plan], bytes],
    ) -> Held:
        """Count, price and reserve this call before it is forwarded, like a metered request.

        The body is parsed and counted by the metered path's own code (off the event loop
        when big); the hold is the counted input plus `passthrough.output_ceiling` output
        tokens per output, at the named model's rates, through the same reservation script
        (budgets, rate limits, revocation; the overdraft for a call that already names the
        overdraft model, since passthrough bodies are never rewritten). A model nothing
        prices is refused unless the workspace allows unpriced calls.
        """
        policy, budgets, settings = deps.policy, deps.budgets, deps.settings
        assert policy is not None and budgets is not None
        job = partial(
            parse_request,
            self.spec,
            raw,
            content_encoding,
            max_body_bytes=settings.max_body_bytes,
            count=deps.count,
        )
        try:
            if len(raw) > settings.offload_bytes:
                prepared = await asyncio.get_running_loop().run_in_executor(deps.executor, job)
            else:
                prepared = job()
        except OpenAIError as err:
            return Held(bad_input=err)
        facts, seen, name = prepared.facts, self.seen, self.seen.target.name
        seen.request_model = utf8_text(facts.model)
        seen.counted_input_tokens = prepared.counted_input_tokens
        ws = policy.workspaces[identity.workspace]
        if not is_priced(deps.prices, facts.model):
            refusal = ws.passthrough.unpriced_model(name, facts.model)
            if refusal is not None:
                return Held(refusal=refusal)
        now = deps.now_ms()
        output = ws.passthrough.held_output(name, facts.output_cap)
        wanted = plan_request(
            policy,
            identity,
            model=facts.model,
            counted_input=prepared.counted_input_tokens,
            output_cap=output,
            prices=deps.prices,
            now_ms=now,
            choices=facts.choices,
        )
        overdraft = policy.routing_for(identity.workspace, identity.service).overdraft
        on_overdraft = overdraft is not None and model_key(overdraft.model) == model_key(
            facts.model
        )
        plan, decision, _ = await budgets.reserve_with_overdraft(
            wanted,
            ws.on_redis_down == "open",
            now,
            orphan=orphan,
            overdraft_nanos=overdraft.nanos if overdraft else None,
            fallback=lambda left: wanted if on_overdraft and left > 0 else None,
        )
        seen.held = decision.allowed
        return Held(
            plan=plan,
            decision=decision,
            ask=lambda: guard.ask(
                deps.prices,
                plan,
                model=facts.model,
                outputs=facts.choices,
                output_param=None,
                stated=False,
                source=f"passthrough.output_ceiling.{name} ({output:,} per output)",
            ),
        )
