"""What the simulated model "does" for one request, decided before any bytes go out.

Streaming and non-streaming answers, and the usage they report, are all rendered
from one Plan, so the numbers agree however the answer is delivered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from extproc.simulator import prompt
from extproc.simulator.caching import PromptCache
from extproc.simulator.text import output_words

DEFAULT_OUTPUT_TOKENS = 24
OUTPUT_TOKENS_HEADER = "x-sim-output-tokens"
SERVED_MODEL_HEADER = "x-sim-served-model"
REASONING_BY_EFFORT = {"none": 0, "minimal": 0, "low": 16, "medium": 64, "high": 256, "xhigh": 512}
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    input_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    words: tuple[str, ...]
    truncated: bool
    reasoning_model: bool = False

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def output_tokens(self) -> int:
        return self.reasoning_tokens + len(self.words)

    def partial(self, words: int) -> Plan:
        """The same plan stopped after `words` output tokens (for failed streams)."""
        return dataclasses.replace(self, words=self.words[:words])


def is_reasoning_model(model: str) -> bool:
    m = model.lower().removeprefix("ft:")
    if "codex" in m:
        return True
    return m.startswith(_REASONING_PREFIXES) and "chat" not in m


def reasoning_tokens(model: str, effort: str | None) -> int:
    if not is_reasoning_model(model):
        return 0
    return REASONING_BY_EFFORT.get(effort or "medium", REASONING_BY_EFFORT["medium"])


def output_budget(wanted: int, reasoning: int, cap: int | None) -> tuple[int, int, bool]:
    """(reasoning, text tokens, truncated): reasoning spends the output cap first."""
    if cap is None or reasoning + wanted <= cap:
        return reasoning, wanted, False
    spent = min(reasoning, cap)
    return spent, cap - spent, True


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number >= 0 else None


def _effort(kind: str, body: dict[str, Any]) -> str | None:
    if kind == "responses":
        reasoning = body.get("reasoning")
        return reasoning.get("effort") if isinstance(reasoning, dict) else None
    effort = body.get("reasoning_effort")
    return effort if isinstance(effort, str) else None


_CAP_KEYS = {
    "responses": ("max_output_tokens",),
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
}


def _prompt_tokens(kind: str, body: dict[str, Any], model: str) -> tuple[list[int], int]:
    if kind == "chat":
        return prompt.chat_prompt(body, model), prompt.REPLY_PRIMING
    if kind == "responses":
        return prompt.responses_prompt(body, model), prompt.REPLY_PRIMING
    tokens = [t for ids in prompt.plain_inputs(body.get("prompt"), model) for t in ids]
    return tokens, 0


def plan_request(
    kind: str, body: dict[str, Any], headers: dict[str, str], cache: PromptCache
) -> Plan:
    """Plan a chat, responses or completions request against the prompt cache."""
    model = str(body.get("model", ""))
    tokens, overhead = _prompt_tokens(kind, body, model)
    scope = (model, body.get("prompt_cache_key") if kind == "responses" or kind == "chat" else None)
    cached = cache.lookup_and_store(scope, tokens)
    cap = next(
        (c for key in _CAP_KEYS[kind] if (c := _int_or_none(body.get(key))) is not None), None
    )
    wanted = _int_or_none(headers.get(OUTPUT_TOKENS_HEADER))
    if wanted is None:
        wanted = DEFAULT_OUTPUT_TOKENS
    spent, text_tokens, truncated = output_budget(
        wanted, reasoning_tokens(model, _effort(kind, body)), cap
    )
    return Plan(
        model=headers.get(SERVED_MODEL_HEADER) or model,
        input_tokens=len(tokens) + overhead,
        cached_tokens=min(cached, len(tokens)),
        reasoning_tokens=spent,
        words=output_words(text_tokens),
        truncated=truncated,
        reasoning_model=is_reasoning_model(model),
    )


def chat_usage(plan: Plan) -> dict[str, Any]:
    """Usage as Chat Completions and legacy Completions report it."""
    return {
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.input_tokens + plan.output_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(plan: Plan) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }
