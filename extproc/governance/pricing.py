"""What a workspace does with what the price table cannot price: the `pricing` policy section.

```yaml
defaults:            # or per workspace
  pricing:
    unknown_models: provisional   # or refuse; default provisional
    tool_calls:                   # built-in tool calls a reservation holds when the request
      web_search: 10              # sets no max_tool_calls (defaults shown)
      file_search: 10
      code_interpreter: 1
      image_generation: 1
```

`provisional` admits a model the price table does not know at its class's provisional rate
(the highest rates listed for its class, see docs/prices.md), flagged on the record, in
metrics and spans, with an alert the first time the model is seen: budgets stay safe and
clients keep working the day OpenAI ships a model. `refuse` answers such a request with an
OpenAI-shaped 400 that names the model and how to price it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.metering.prices import PriceTable
from extproc.wire.errors import OpenAIError

FIELDS = ("unknown_models", "tool_calls")
UNKNOWN_MODEL_ACTIONS = ("provisional", "refuse")
TOOL_KINDS = ("web_search", "file_search", "code_interpreter", "image_generation")
DEFAULT_TOOL_CALLS = {"web_search": 10, "file_search": 10, "code_interpreter": 1,
                      "image_generation": 1}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PricingPolicy:
    unknown_models: str = "provisional"
    tool_calls: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_TOOL_CALLS))

    def __post_init__(self) -> None:
        # The preview search tool holds what the search tool does.
        calls = dict(self.tool_calls)
        calls.setdefault("web_search_preview", calls.get("web_search", 1))
        object.__setattr__(self, "tool_calls", calls)

    def refusal(self, model: str, prices: PriceTable) -> OpenAIError | None:
        """The 400 for a model nothing prices, when this workspace refuses them; else None."""
        if self.unknown_models != "refuse" or prices.row(model) is not None:
            return None
        return unpriced_model(model, prices.version)


def unpriced_model(model: str, version: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"The model '{model}' has no price in this gateway's price table ({version}), and "
        "this workspace does not serve models it cannot price. Use a priced model, or ask "
        "your platform team to add a row for it to the price file (see docs/prices.md: "
        "`extproc prices check` lists every unpriced model in use).",
        "invalid_request_error",
        "model",
        "model_not_priced",
    )


DEFAULT = PricingPolicy()

Report = Callable[[str, str], None]


def parse_pricing(path: str, value: Any, inherited: PricingPolicy, error: Report) -> PricingPolicy:
    """The section at `path` over `inherited`, field by field; problems go to `error`."""
    if value is None:
        return inherited
    if not isinstance(value, Mapping):
        error(path, f"must be a mapping with {', '.join(FIELDS)}")
        return inherited
    for key in value:
        if key not in FIELDS:
            hint = difflib.get_close_matches(str(key), FIELDS, n=1)
            error(
                f"{path}.{key}", "unknown field" + (f' (did you mean "{hint[0]}"?)' if hint else "")
            )
    action = inherited.unknown_models
    if "unknown_models" in value:
        raw = value["unknown_models"]
        if raw not in UNKNOWN_MODEL_ACTIONS:
            error(f"{path}.unknown_models", f"must be one of {', '.join(UNKNOWN_MODEL_ACTIONS)}")
        else:
            action = raw
    calls = dict(inherited.tool_calls)
    if "tool_calls" in value:
        raw = value["tool_calls"]
        if not isinstance(raw, Mapping):
            error(f"{path}.tool_calls", f"must be a mapping of {', '.join(TOOL_KINDS)} to counts")
        else:
            for kind, count in raw.items():
                if kind not in TOOL_KINDS:
                    hint = difflib.get_close_matches(str(kind), TOOL_KINDS, n=1)
                    error(
                        f"{path}.tool_calls.{kind}",
                        "unknown tool"
                        + (f' (did you mean "{hint[0]}"?)' if hint else "")
                        + f"; known: {', '.join(TOOL_KINDS)}",
                    )
                elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    error(
                        f"{path}.tool_calls.{kind}", f"must be a whole number >= 0, got {count!r}"
                    )
                else:
                    calls[kind] = count
    calls.pop("web_search_preview", None)
    return PricingPolicy(unknown_models=action, tool_calls=calls)
