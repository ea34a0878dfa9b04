"""Which non-metered OpenAI endpoints a workspace may use: the `passthrough` policy section.

```yaml
defaults:            # or per workspace
  passthrough:
    endpoints: [models, files, responses, moderations]   # default: every group
    allow_unpriced: false                                 # default: false
    output_ceiling:                                       # output tokens held per output
      responses.compact: 16384                            # (defaults shown)
      images.generations: 6240                            # per image (`n` of them)
```

Groups are those of `extproc.wire.spec.GROUPS`. Calls that cost nothing (reads, deletes,
moderation) and calls whose answer carries priceable usage are allowed when their group is
listed. A call that costs money the answer does not state (a batch job, speech synthesis,
vector-store writes) is allowed only with `allow_unpriced: true`: by default the gateway
refuses what it cannot bill. Each call allowed is still recorded in the ledger.

Calls priced from their usage (`extproc.wire.spec.PRICED`) are held against the budget before
they are forwarded, like metered calls: their counted input plus, since neither endpoint
has an output cap the provider enforces, `output_ceiling` output tokens per output. A
model the price table does not know is unpriced too: refused unless `allow_unpriced`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.wire.errors import OpenAIError
from extproc.wire.spec import GROUPS, PRICED, EndpointSpec, Pricing

FIELDS = ("endpoints", "allow_unpriced", "output_ceiling")
Ceiling = tuple[tuple[str, int], ...]
"""Output tokens per priced endpoint, as (endpoint, tokens) pairs: hashable, like the policy."""
DEFAULT_OUTPUT_CEILING: Ceiling = tuple(
    (name, spec.output_ceiling) for name, spec in PRICED.items() if spec.output_ceiling
)
"""Each priced endpoint's own ceiling, as its spec states it."""
MAX_OUTPUT_CEILING = 2_147_483_647


@dataclass(frozen=True, slots=True)
class PassthroughPolicy:
    endpoints: frozenset[str] = frozenset(GROUPS)
    allow_unpriced: bool = False
    output_ceiling: Ceiling = DEFAULT_OUTPUT_CEILING

    def held_output(self, name: str, stated_cap: int | None) -> int:
        """Output tokens to hold per output of a priced call to endpoint `name`."""
        if stated_cap is not None:
            return stated_cap
        return next(tokens for endpoint, tokens in self.output_ceiling if endpoint == name)

    def unpriced_model(self, name: str, model: str) -> OpenAIError | None:
        """The refusal of a priced endpoint's call on a model nothing prices, unless the
        workspace allows unpriced calls (then it is served and recorded `unpriced`)."""
        if self.allow_unpriced:
            return None
        return OpenAIError(
            403,
            f"The model '{model}' has no price in extproc's price table, so this {name} call "
            "could not be billed, and this workspace does not allow unpriced calls "
            "(passthrough.allow_unpriced). Use a priced model, or ask your platform team to "
            f"add a price for '{model}'.",
            "permission_error",
            "model",
            "unpriced_model_not_allowed",
        )

    def refusal(self, spec: EndpointSpec) -> OpenAIError | None:
        """Why this workspace may not call `spec`'s endpoint, in OpenAI's shape; None when
        it may."""
        name = spec.name
        if spec.group not in self.endpoints:
            return OpenAIError(
                403,
                f"The {name} endpoint is not enabled for this workspace. Ask your platform "
                f"team to add '{spec.group}' to the workspace's passthrough.endpoints.",
                "permission_error",
                None,
                "endpoint_not_allowed",
            )
        if spec.pricing is Pricing.UNPRICED and not self.allow_unpriced:
            return OpenAIError(
                403,
                f"The {name} endpoint costs money that extproc cannot price from the answer, "
                "and this workspace does not allow unpriced endpoints "
                "(passthrough.allow_unpriced).",
                "permission_error",
                None,
                "unpriced_endpoint_not_allowed",
            )
        return None


DEFAULT = PassthroughPolicy()

Report = Callable[[str, str], None]
"""Called with (field path, problem) for every problem found."""


def parse_passthrough(
    path: str, value: Any, inherited: PassthroughPolicy, error: Report
) -> PassthroughPolicy:
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
                f"{path}.{key}",
                "unknown field" + (f' (did you mean "{hint[0]}"?)' if hint else ""),
            )
    endpoints = inherited.endpoints
    if "endpoints" in value:
        raw = value["endpoints"]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            error(f"{path}.endpoints", f"must be a list of names from: {', '.join(GROUPS)}")
        else:
            for name in raw:
                if name not in GROUPS:
                    hint = difflib.get_close_matches(name, GROUPS, n=1)
                    error(
                        f"{path}.endpoints",
                        f'unknown endpoint group "{name}"'
                        + (f' (did you mean "{hint[0]}"?)' if hint else "")
                        + f"; known: {', '.join(GROUPS)}",
                    )
            endpoints = frozenset(raw) & frozenset(GROUPS)
    allow_unpriced = inherited.allow_unpriced
    if "allow_unpriced" in value:
        raw = value["allow_unpriced"]
        if not isinstance(raw, bool):
            error(f"{path}.allow_unpriced", "must be true or false")
        else:
            allow_unpriced = raw
    ceiling = inherited.output_ceiling
    if "output_ceiling" in value:
        ceiling = _ceiling(f"{path}.output_ceiling", value["output_ceiling"], ceiling, error)
    return PassthroughPolicy(
        endpoints=endpoints, allow_unpriced=allow_unpriced, output_ceiling=ceiling
    )


def _ceiling(path: str, value: Any, inherited: Ceiling, error: Report) -> Ceiling:
    """`output_ceiling`: output tokens per priced endpoint, each over the inherited one."""
    names = tuple(PRICED)
    if not isinstance(value, Mapping):
        error(path, f"must be a mapping of endpoint to output tokens, from: {', '.join(names)}")
        return inherited
    merged = dict(inherited)
    for name, tokens in value.items():
        where = f"{path}.{name}"
        if name not in PRICED:
            hint = difflib.get_close_matches(str(name), names, n=1)
            error(
                where,
                "not an endpoint priced from its usage"
                + (f' (did you mean "{hint[0]}"?)' if hint else "")
                + f"; known: {', '.join(names)}",
            )
        elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            error(where, f"must be a positive number of output tokens, got {tokens!r}")
        elif tokens > MAX_OUTPUT_CEILING:
            error(where, f"must be at most {MAX_OUTPUT_CEILING}, got {tokens}")
        else:
            merged[name] = tokens
    return tuple(merged.items())
